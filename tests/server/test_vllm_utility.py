"""vLLM's utility routes: /tokenize with vLLM's body (beside TEI's on the same path), /detokenize, /version;
against the model's own tokenizer through transformers."""

from __future__ import annotations

import pytest

import server

TEXT = "Tokenizing héllo, wörld"


@pytest.fixture(scope="module")
def hf_tokenizer():
    from models.config import default_model_path  # noqa: PLC0415
    from tests.hf_import import import_transformers  # noqa: PLC0415

    return import_transformers().AutoTokenizer.from_pretrained(default_model_path())  # the dummy server's tokenizer


def test_tokenize_with_vllms_body_answers_vllms_shape(client, hf_tokenizer, srv):
    ids = hf_tokenizer(TEXT)["input_ids"]
    r = client.post("/tokenize", json={"prompt": TEXT})
    assert r.status_code == 200, r.text
    assert r.json() == {"count": len(ids), "max_model_len": srv.app.state.engine.info.max_input_length, "tokens": ids,
                        "token_strs": None}
    r = client.post("/tokenize", json={"model": "dummy", "prompt": TEXT, "add_special_tokens": False, "return_token_strs": True})
    bare = hf_tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert r.json()["tokens"] == bare and r.json()["token_strs"] == hf_tokenizer.convert_ids_to_tokens(bare)
    tei = client.post("/tokenize", json={"inputs": TEXT}).json()  # TEI's body: TEI's answer, as before
    assert [t["id"] for t in tei[0]] == ids and tei[0][1]["start"] == 0


def test_detokenize_and_version(client, hf_tokenizer):
    ids = hf_tokenizer(TEXT)["input_ids"]
    r = client.post("/detokenize", json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": hf_tokenizer.decode(ids)}
    assert client.get("/version").json() == {"version": server.__version__}


@pytest.mark.parametrize("path, body, status, where", [
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "error.message"),
    ("/detokenize", {"model": "other", "tokens": [1]}, 404, "error.message"),
    ("/detokenize", {}, 400, "error.message"),
    ("/tokenize", {"model": "other", "prompt": "x"}, 404, "error"),
    ("/tokenize", {}, 422, "error"),
])
def test_errors_are_clear_and_the_server_keeps_serving(client, path, body, status, where):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    value = r.json()
    for key in where.split("."):
        value = value[key]
    assert isinstance(value, str) and value
    assert client.post("/tokenize", json={"prompt": "still here"}).status_code == 200
