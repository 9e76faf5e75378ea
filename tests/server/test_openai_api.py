"""OpenAI embeddings API through the official `openai` client, unmodified."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest
from openai import OpenAI

from tests.support import MODEL, dummy_server, expected_vector


@pytest.fixture
def oai(srv):
    return OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _vec(embedding):
    """An embedding as numpy, decoding base64 (the client leaves it encoded when asked for explicitly)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding)


def _unit(v):
    return v / np.linalg.norm(v)


def _ids(srv, text):
    return srv.app.state.engine.tokenizer.encode([text])[0].ids


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_string_and_list_inputs(srv, oai, fmt):
    texts = ["hello there", "general kenobi", "x"]
    r = oai.embeddings.create(model=MODEL, input=texts, encoding_format=fmt)
    assert [d.index for d in r.data] == [0, 1, 2]
    for d, text in zip(r.data, texts):
        np.testing.assert_allclose(_vec(d.embedding), _unit(expected_vector(_ids(srv, text))), rtol=1e-5)
    assert r.usage.prompt_tokens == sum(len(_ids(srv, t)) for t in texts)
    assert r.model == MODEL
    one = oai.embeddings.create(model=MODEL, input="hello there", encoding_format=fmt)
    np.testing.assert_allclose(_vec(one.data[0].embedding), _vec(r.data[0].embedding), rtol=1e-6)


def test_default_encoding_of_the_client_is_base64(srv, oai):
    # openai>=1 asks for base64 when encoding_format is not given, and decodes it itself.
    r = oai.embeddings.create(model=MODEL, input="decode me")
    np.testing.assert_allclose(r.data[0].embedding, _unit(expected_vector(_ids(srv, "decode me"))), rtol=1e-5)


def test_token_id_inputs(oai):
    single = oai.embeddings.create(model=MODEL, input=[101, 2023, 102], encoding_format="float")
    several = oai.embeddings.create(model=MODEL, input=[[101, 2023, 102], [101, 102]], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, _unit(expected_vector([101, 2023, 102])), rtol=1e-5)
    np.testing.assert_allclose(several.data[1].embedding, _unit(expected_vector([101, 102])), rtol=1e-5)
    assert several.usage.prompt_tokens == 5


def test_dimensions_truncate_and_renormalise(srv, oai):
    r = oai.embeddings.create(model=MODEL, input="matryoshka", dimensions=4, encoding_format="float")
    full = expected_vector(_ids(srv, "matryoshka"))
    np.testing.assert_allclose(r.data[0].embedding, _unit(full[:4]), rtol=1e-5)
    with pytest.raises(openai.BadRequestError) as err:
        oai.embeddings.create(model=MODEL, input="matryoshka", dimensions=3)
    assert "dimensions=3" in err.value.body["message"] if isinstance(err.value.body, dict) else True
    assert err.value.status_code == 400
    with srv.client() as c:  # TEI's /embed: cut, then normalised only when asked (as TEI and sentence-transformers)
        cut = c.post("/embed", json={"inputs": "matryoshka", "dimensions": 4, "normalize": False}).json()[0]
        unit = c.post("/embed", json={"inputs": "matryoshka", "dimensions": 4}).json()[0]
    np.testing.assert_allclose(cut, full[:4], rtol=1e-5)
    np.testing.assert_allclose(unit, _unit(full[:4]), rtol=1e-5)


def test_vllms_normalize_field_is_honoured(srv, oai):
    """vLLM's extra_body={"normalize": false} (it was ignored: unit vectors came back)."""
    full = expected_vector(_ids(srv, "raw"))
    raw = oai.embeddings.create(model=MODEL, input="raw", encoding_format="float", extra_body={"normalize": False})
    np.testing.assert_allclose(raw.data[0].embedding, full, rtol=1e-5)
    unit = oai.embeddings.create(model=MODEL, input="raw", encoding_format="float", extra_body={"normalize": True})
    np.testing.assert_allclose(unit.data[0].embedding, _unit(full), rtol=1e-5)


def test_infinity_clients_body_dimensions_0_is_the_full_size(srv):
    """infinity's generated client (infinity_client) sends this body for every embeddings call: 0 means full size."""
    body = {"input": ["matryoshka"], "model": "default/not-specified", "dimensions": 0, "modality": "text"}
    with srv.client() as c:
        r = c.post("/embeddings", json=body)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["data"][0]["embedding"], _unit(expected_vector(_ids(srv, "matryoshka"))), rtol=1e-5)


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.embeddings.create(model="gpt-nope", input="x")
    assert err.value.body["code"] == "model_not_found" and "model.aliases" in err.value.body["message"]


def test_aliases_and_the_hub_id_of_the_served_name_are_taken():
    """Client code written for OpenAI (text-embedding-3-small) or for vLLM (the Hub id) keeps its model name."""
    with dummy_server(model={"aliases": ["text-embedding-3-small"]}) as s:
        oai = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        want = oai.embeddings.create(model=MODEL, input="x").data[0].embedding
        for name in ("text-embedding-3-small", f"sentence-transformers/{MODEL}"):
            assert oai.embeddings.create(model=name, input="x").data[0].embedding == want
        with pytest.raises(openai.NotFoundError) as err:
            oai.embeddings.create(model="text-embedding-ada-002", input="x")
        assert "text-embedding-3-small" in err.value.body["message"]
        oai.close()


def test_models_list(oai):
    assert [m.id for m in oai.models.list().data] == [MODEL]


def test_models_retrieve(oai):
    card = oai.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-nope")
    assert err.value.body["code"] == "model_not_found"
