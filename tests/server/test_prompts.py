"""sentence-transformers prompts (config_sentence_transformers.json): prompt_name on the TEI routes, the model's
default prompt on every route, against sentence-transformers on the same folder; bad names refused."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from configs.settings import load_settings
from models.config import ModelFolderError, default_model_path
from models.runtime import load_model
from server.app import create_app
from tests.support import ServerThread, dummy_server, expected_vector, settings

PROMPTS = {"query": "query: ", "passage": "passage: "}
TEXTS = ["how do transformers batch requests?", "Packed execution computes no padding."]


def _folder(tmp_path, default: str | None, name: str = "prompted"):
    """The embedded model's folder with prompts added (the weights linked, not copied)."""
    src, dst = default_model_path(), tmp_path / name
    dst.mkdir()
    for item in src.iterdir():
        (dst / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (dst / "config_sentence_transformers.json").unlink()
    (dst / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS, "default_prompt_name": default}))
    return dst


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """A server on the model with prompts and "query" as its default; sentence-transformers on the same folder."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    folder = _folder(tmp_path_factory.mktemp("m"), "query")
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "prompted"}))) as s:
        yield s, SentenceTransformer(str(folder), device="cpu")


def test_prompt_name_and_the_default_prompt_match_sentence_transformers(prompted):
    server, st = prompted
    with httpx.Client(base_url=server.url, timeout=60) as c:
        for name in ("passage", None):  # None: the model's default, "query"
            body = {"inputs": TEXTS, **({"prompt_name": name} if name else {})}
            got = np.asarray(c.post("/embed", json=body).json())
            want = st.encode(TEXTS, prompt_name=name, normalize_embeddings=True)
            np.testing.assert_allclose(got, want, atol=1e-5)
        plain = st.encode(TEXTS, prompt="", normalize_embeddings=True)
        assert not np.allclose(got, plain, atol=1e-3)  # the prompt changes the answer: the comparison above could fail
        # Other routes: OpenAI gets the default prompt; /tokenize shows the prompted text's tokens and offsets.
        openai = c.post("/v1/embeddings", json={"input": TEXTS[0], "model": "prompted"}).json()
        np.testing.assert_allclose(openai["data"][0]["embedding"], want[0], atol=1e-5)
        tokens = c.post("/tokenize", json={"inputs": "hello", "prompt_name": "passage"}).json()[0]
        assert [t["text"] for t in tokens] == ["[CLS]", "passage", ":", "hello", "[SEP]"]
        assert tokens[3]["start"] == len("passage: ")


def test_unknown_prompt_names_and_prompts_with_token_ids_are_refused(prompted):
    server, _ = prompted
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/embed", json={"inputs": "x", "prompt_name": "nope"})
        assert r.status_code == 422 and "passage, query" in r.json()["error"]
        r = c.post("/embed", json={"inputs": [101, 7592, 102], "prompt_name": "query"})
        assert r.status_code == 422 and "token ids" in r.json()["error"]
        assert c.post("/embed", json={"inputs": "still serving"}).status_code == 200


def test_a_default_prompt_name_the_model_lacks_refuses_to_load(tmp_path):
    with pytest.raises(ModelFolderError, match="not one of its prompts"):
        load_model(str(_folder(tmp_path, "missing")), memory_arena=False)
    folder = _folder(tmp_path, None, "no_default")
    with pytest.raises(ModelFolderError, match="default_prompt_name='other'"):
        load_model(str(folder), memory_arena=False, default_prompt_name="other")
    shutil.rmtree(folder)


def test_auto_truncate_and_a_default_prompt_text_as_tei_flags_set_them():
    long_text = " ".join(f"w{i}" for i in range(100))
    with dummy_server(model={"auto_truncate": True, "default_prompt": "query: "}) as s, s.client() as c:
        tok = s.app.state.engine.tokenizer
        assert c.get("/info").json()["auto_truncate"] is True
        r = c.post("/embed", json={"inputs": long_text, "normalize": False})  # no `truncate`: the server's default
        ids = tok.encode(["query: " + long_text], True)[0].ids
        assert r.status_code == 200 and len(ids) == 32
        np.testing.assert_allclose(r.json()[0], expected_vector(ids), rtol=1e-5)
        assert c.post("/embed", json={"inputs": long_text, "truncate": False}).status_code == 413  # asked: refused
        openai = c.post("/v1/embeddings", json={"input": long_text, "model": s.app.state.engine.info.name})
        assert openai.status_code == 200 and openai.json()["usage"]["prompt_tokens"] == 32
        tokens = c.post("/tokenize", json={"inputs": "x"}).json()[0]
        assert [t["text"] for t in tokens] == ["[CLS]", "query", ":", "x", "[SEP]"]
    with dummy_server() as s, s.client() as c:  # the defaults: neither
        assert c.get("/info").json()["auto_truncate"] is False
        assert c.post("/embed", json={"inputs": long_text}).status_code == 413


def test_default_prompt_and_default_prompt_name_are_exclusive():
    with pytest.raises(ValidationError, match="set one"):
        load_settings(None, {"model": {"default_prompt": "q: ", "default_prompt_name": "query"}})
