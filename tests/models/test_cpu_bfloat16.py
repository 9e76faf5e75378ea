"""model.dtype: bfloat16 on the CPU path (torch's bf16 GEMMs, fp32 pooling): against sentence-transformers in
float32 and against our own float32 path, with and without the memory arena, through the server and the
openai client; a classifier's logits against transformers; float16 refused on the CPU with a reason."""

from __future__ import annotations

import numpy as np
import pytest

from models.config import ModelFolderError
from models.runtime import cpu_has_bf16, finish_embedding, load_model
from server.app import create_app
from tests.models.test_parity import _texts
from tests.support import ServerThread, settings


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def bf16():
    return load_model(None, dtype="bfloat16")


@pytest.mark.slow
def test_bfloat16_embeddings_match_sentence_transformers_in_float32(bf16):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    embedder, tokenizer, info = bf16
    assert info.dtype == "bfloat16" and embedder.arena is not None
    assert next(embedder.encoder.parameters()).dtype.is_floating_point and str(next(embedder.encoder.parameters()).dtype) == "torch.bfloat16"
    texts = _texts(tokenizer, 80)
    ids = [e.ids for e in tokenizer.encode(texts)]
    ours = np.concatenate([embedder.embed(ids[i:i + 29]) for i in range(0, len(ids), 29)])
    assert ours.dtype == np.float32
    ref = SentenceTransformer(info.path, device="cpu").encode(texts, batch_size=32, convert_to_numpy=True)
    cosine = _cos(ours, ref)
    assert cosine.min() >= 0.9995, cosine.min()
    assert cosine.max() < 1 - 1e-7  # it is not the float32 model under another name
    # The arena changes where intermediates live, not what they hold.
    fresh, _, _ = load_model(None, dtype="bfloat16", memory_arena=False)
    np.testing.assert_array_equal(fresh.embed(ids[:29]), ours[:29])
    # Per-token states come back as float32 arrays, close to the float32 model's.
    fp32, _, _ = load_model(None)
    got, want = embedder.embed(ids[:2], per_token=[True, True]), fp32.embed(ids[:2], per_token=[True, True])
    assert got[0].dtype == np.float32 and got[0].shape == want[0].shape
    assert _cos(got[1], want[1]).min() >= 0.995


def test_a_classifier_in_bfloat16_scores_as_transformers(tmp_path):
    from tests.cross_encoders import cross_encoder_folder  # noqa: PLC0415
    from tests.server.test_rerank import PAIRS, hf_logits  # noqa: PLC0415

    folder = cross_encoder_folder(tmp_path, ("negative", "neutral", "positive"), seed=1)
    embedder, tokenizer, info = load_model(str(folder), dtype="bfloat16")
    encoded = tokenizer.encode_pairs(PAIRS)
    got = embedder.embed([e.ids for e in encoded], segments=[e.segment for e in encoded])
    want = hf_logits(folder, pairs=PAIRS)
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.05
    assert (got.argmax(1) == want.argmax(1)).all()


def test_float16_is_refused_on_the_cpu_with_a_reason():
    with pytest.raises(ModelFolderError, match="float16 is not supported on CPU.*bfloat16"):
        load_model(None, dtype="float16")


def test_cpu_has_bf16_reads_the_cpu_flags():
    flags = open("/proc/cpuinfo").read()
    assert cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


@pytest.mark.slow
def test_the_server_in_bfloat16_answers_the_openai_client(bf16):
    import openai  # noqa: PLC0415

    _, tokenizer, _ = bf16
    texts = _texts(tokenizer, 6, seed=3)
    fp32, _, info = load_model(None)
    want = finish_embedding(fp32.embed([e.ids for e in tokenizer.encode(texts)]), True)
    with ServerThread(create_app(settings(model={"dtype": "bfloat16", "warmup": True}))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        got = np.array([d.embedding for d in client.embeddings.create(model=info.name, input=texts).data])
        assert _cos(got, want).min() >= 0.9995
        with server.client() as c:
            assert c.get("/info").json()["model_dtype"] == "bfloat16"
