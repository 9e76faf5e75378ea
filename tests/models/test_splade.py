"""SPLADE (sparse) embedding models: a *ForMaskedLM folder pooled by max over tokens of log(1 + relu(MLM
logits)), against sentence-transformers' SparseEncoder on the same weights; TEI's /embed_sparse and the other
routes' answers for such a model, through the real server."""

from __future__ import annotations

import numpy as np
import pytest

from models.config import ModelFolderError
from models.runtime import load_model
from server.app import create_app
from tests.cross_encoders import splade_folder
from tests.support import ServerThread, settings

TEXTS = ["what is deep learning?", "Sparse retrieval with SPLADE weighs vocabulary words, " * 30, "x",
         "Paris is the capital of France."]


def _reference(folder, texts):
    from sentence_transformers import SparseEncoder  # noqa: PLC0415
    from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling  # noqa: PLC0415

    if (folder / "modules.json").exists():
        model = SparseEncoder(str(folder), device="cpu")
    else:
        model = SparseEncoder(modules=[MLMTransformer(str(folder)), SpladePooling(pooling_strategy="max")], device="cpu")
    return model.encode(texts, convert_to_tensor=True).to_dense().numpy()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("splade")


@pytest.mark.parametrize("style, saved_by", [("bert", "transformers"), ("distilbert", "transformers"),
                                             ("bert", "sentence-transformers")])
def test_splade_weights_equal_sentence_transformers_sparse_encoder(root, style, saved_by):
    folder = splade_folder(root, style, saved_by=saved_by)
    embedder, tokenizer, info = load_model(str(folder), max_input_length=128)
    assert (info.pooling, info.dim, info.normalize, info.sparse, info.kind) == ("splade", 30522, False, True, "embedding")
    ids = [e.ids for e in tokenizer.encode(TEXTS, truncate=True)]
    assert max(len(x) for x in ids) == 128  # the long text spans chunks of the head (and the arena's buckets)
    got = embedder.embed(ids)
    want = _reference(folder, [tokenizer._full.decode(x, skip_special_tokens=True) for x in ids])
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert ((got > 0) == (want > 0)).mean() > 0.999


def test_the_head_works_in_chunks_and_batches(root, monkeypatch):
    from models.encoder import SpladeHead  # noqa: PLC0415

    embedder, tokenizer, _ = load_model(str(splade_folder(root)), memory_arena=False)
    ids = [e.ids for e in tokenizer.encode(TEXTS)]
    whole = embedder.embed(ids)
    monkeypatch.setattr(SpladeHead, "CHUNK_TOKENS", 7)  # chunks that split sequences (other GEMM shapes: rounding)
    chunked = embedder.embed(ids)
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    assert ((chunked > 0) == (whole > 0)).all()
    np.testing.assert_allclose(np.concatenate([embedder.embed([x]) for x in ids]), whole, atol=1e-6)


def test_splade_pooling_needs_a_masked_lm_head():
    with pytest.raises(ModelFolderError, match="pooling=splade needs a \\*ForMaskedLM model"):
        load_model(None, pooling="splade")


@pytest.fixture(scope="module")
def server(root):
    folder = splade_folder(root)
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "splade"}))) as s, s.client() as c:
        yield c, folder


def test_embed_sparse_answers_teis_shape(server):
    c, folder = server
    r = c.post("/embed_sparse", json={"inputs": TEXTS[:2]})
    assert r.status_code == 200, r.text
    want = _reference(folder, TEXTS[:2])
    for row, dense in zip(r.json(), want):
        assert [x["index"] for x in row] == np.flatnonzero(dense).tolist()  # by index, zeros left out
        np.testing.assert_allclose([x["value"] for x in row], dense[dense > 0], atol=2e-5, rtol=1e-5)
    assert c.get("/info").json()["model_type"] == {"embedding": {"pooling": "splade"}}
    assert c.post("/", json={"inputs": TEXTS[0]}).json() == c.post("/embed_sparse", json={"inputs": TEXTS[0]}).json()
    vertex = c.post("/vertex", json={"instances": [{"inputs": TEXTS[0]}]}).json()["predictions"]
    assert vertex == [c.post("/embed_sparse", json={"inputs": TEXTS[0]}).json()]


def test_other_routes_answer_as_tei_does_for_a_splade_model(server):
    c, folder = server
    dense = c.post("/embed", json={"inputs": TEXTS[0], "normalize": False})
    assert dense.status_code == 200 and len(dense.json()[0]) == 30522
    np.testing.assert_allclose(dense.json()[0], _reference(folder, TEXTS[:1])[0], atol=2e-5, rtol=1e-5)
    for path, body, needle in [("/embed", {"inputs": "a"}, "`normalize` is not available for SPLADE models"),
                               ("/embed_all", {"inputs": "a"}, "`/embed_all` is not available for SPLADE models"),
                               ("/similarity", {"inputs": {"source_sentence": "a", "sentences": ["b"]}}, "SPLADE")]:
        r = c.post(path, json=body)
        assert r.status_code == 424 and needle in r.json()["error"] and r.json()["error_type"] == "Backend", r.text
    r = c.post("/v1/embeddings", json={"model": "splade", "input": "a"})
    assert r.status_code == 400 and "/embed_sparse" in r.json()["error"]["message"]
    assert c.post("/embed_sparse", json={"inputs": ""}).status_code == 400
    assert c.post("/embed_sparse", json={"inputs": "still serving"}).status_code == 200


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_cuda_code_path_gives_the_same_sparse_weights_on_the_emulator(root, dtype):
    """The encoder's CUDA path (kernels on the CPU emulator) in half precision feeding the SPLADE head."""
    from kernels import cuda, emulate  # noqa: PLC0415

    if emulate.compiler() is None:
        pytest.skip("no C++ compiler for the emulator")
    folder = splade_folder(root)
    embedder, tokenizer, _ = load_model(str(folder))
    ids = [e.ids for e in tokenizer.encode(TEXTS[:3], truncate=True)]
    want = embedder.embed(ids)
    with cuda.emulation():
        half, _, _ = load_model(str(folder), dtype=dtype)
        got = half.embed(ids)
    np.testing.assert_allclose(got, want, atol=0.03, rtol=0.03)
    strong = want > 0.05  # a weight well above zero stays non-zero
    assert (got[strong] > 0).all()


def test_splade_in_bfloat16_on_the_cpu(root):
    folder = splade_folder(root)
    fp32, tokenizer, _ = load_model(str(folder))
    bf16, _, _ = load_model(str(folder), dtype="bfloat16")
    ids = [e.ids for e in tokenizer.encode(TEXTS[:3], truncate=True)]
    want, got = fp32.embed(ids), bf16.embed(ids)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=0.02)
    assert (got[want > 0.05] > 0).all()
