"""The packed encoder against the peer libraries that define the right answer."""

from __future__ import annotations

import random
import shutil

import numpy as np
import pytest
import torch

from models.config import default_model_path
from models.encoder import PackedBatch
from models.runtime import finish_embedding, load_model


@pytest.fixture(scope="module")
def minilm():
    return load_model(None)


def _texts(tokenizer, count: int, seed: int = 0) -> list[str]:
    """Texts of 1..254 content tokens (3..256 with [CLS]/[SEP]) made of whole vocabulary words."""
    vocab = [w for w in tokenizer._full.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    vocab.sort()
    rng = random.Random(seed)
    lengths = [1, 254] + [rng.randint(1, 254) for _ in range(count - 2)]
    return [" ".join(rng.choice(vocab) for _ in range(n)) for n in lengths]


def _embed_in_batches(embedder, ids: list[list[int]], size: int = 37) -> np.ndarray:
    return np.concatenate([embedder.embed(ids[i:i + size]) for i in range(0, len(ids), size)])


@pytest.mark.slow
def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    embedder, tokenizer, info = minilm
    texts = _texts(tokenizer, 200)
    ids = [e.ids for e in tokenizer.encode(texts)]
    lengths = [len(x) for x in ids]
    assert min(lengths) == 3 and max(lengths) == 256
    ours = finish_embedding(_embed_in_batches(embedder, ids), info.normalize)
    st = SentenceTransformer(info.path, device="cpu")
    ref = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cosine = (ours * ref).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cosine.min() >= 0.99999, cosine.min()


@pytest.mark.slow
def test_minilm_hidden_states_match_transformers(minilm):
    from transformers import AutoModel  # noqa: PLC0415

    embedder, tokenizer, info = minilm
    texts = _texts(tokenizer, 60, seed=1)
    ids = [e.ids for e in tokenizer.encode(texts)]
    batch = PackedBatch.from_ids(ids, 0)
    with torch.inference_mode():
        ours = embedder.encoder(batch)
    hf = AutoModel.from_pretrained(info.path).eval()
    worst = 0.0
    for start in range(0, len(ids), 20):
        chunk = ids[start:start + 20]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in chunk])
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk])
        with torch.inference_mode():
            ref = hf(input_ids=input_ids, attention_mask=mask).last_hidden_state
        for j, x in enumerate(chunk):
            s, e = batch.cu_seqlens[start + j], batch.cu_seqlens[start + j + 1]
            worst = max(worst, (ours[s:e] - ref[j, : len(x)]).abs().max().item())
    assert worst <= 1e-4, worst


def _tiny_folder(tmp_path, kind: str, act: str):
    import transformers as tf  # noqa: PLC0415

    common = dict(vocab_size=30522, max_position_embeddings=80)
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                            hidden_act=act, **common)
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif kind == "roberta":
        cfg = tf.RobertaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                               hidden_act=act, pad_token_id=1, type_vocab_size=1, **common)
        model = tf.RobertaModel(cfg, add_pooling_layer=False)
    else:
        cfg = tf.DistilBertConfig(dim=48, n_layers=2, n_heads=4, hidden_dim=96, activation=act, **common)
        model = tf.DistilBertModel(cfg)
    torch.manual_seed(0)
    for p in model.parameters():  # random weights of a realistic scale, LayerNorms included
        torch.nn.init.normal_(p, std=0.2)
    folder = tmp_path / kind
    model.eval().save_pretrained(folder)
    shutil.copy(default_model_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder, model


@pytest.mark.parametrize("kind,act", [("bert", "gelu"), ("bert", "gelu_new"), ("bert", "gelu_pytorch_tanh"), ("bert", "silu"),
                                      ("roberta", "gelu"), ("distilbert", "gelu")])
def test_tiny_random_models_match_transformers(tmp_path, kind, act):
    folder, hf = _tiny_folder(tmp_path, kind, act)
    embedder, _, info = load_model(str(folder))
    # no sentence-transformers config: mean, unnormalised, as SentenceTransformer makes of a plain folder
    assert info.pooling == "mean" and not info.normalize
    rng = random.Random(3)
    seqs = [[rng.randint(5, 30000) for _ in range(n)] for n in (1, 7, 33, 60, 2)]
    seqs.append([0, 2000, 3000, 1, 4000, 1, 5000, 2])  # RoBERTa's padding id (1) inside: its positions skip it
    batch = PackedBatch.from_ids(seqs, embedder.position_offset)
    with torch.inference_mode():
        ours = embedder.encoder(batch)
        for i, seq in enumerate(seqs):
            ref = hf(input_ids=torch.tensor([seq])).last_hidden_state[0]
            got = ours[batch.cu_seqlens[i]:batch.cu_seqlens[i + 1]]
            assert (got - ref).abs().max().item() <= 1e-4
    pooled = embedder.embed(seqs)
    np.testing.assert_allclose(pooled[2], ours[batch.cu_seqlens[2]:batch.cu_seqlens[3]].mean(0).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_pooling_modes_on_packed_tokens():
    from models.encoder import pool  # noqa: PLC0415

    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)  # 2 sequences: 2 and 4 tokens
    batch = PackedBatch.from_ids([[5, 6], [7, 8, 9, 10]], 0)
    assert pool(hidden, batch, "cls").tolist() == [[0, 1], [4, 5]]
    assert pool(hidden, batch, "last").tolist() == [[2, 3], [10, 11]]
    assert pool(hidden, batch, "mean").tolist() == [[1, 2], [7, 8]]


def test_refuses_pickle_weights_and_unknown_types(tmp_path):
    from models.config import ModelFolderError  # noqa: PLC0415
    from models.folder import read_model_folder  # noqa: PLC0415

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelFolderError, match="pickle-based weights are refused"):
        read_model_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelFolderError, match="not supported"):
        read_model_folder(tmp_path)
    with pytest.raises(ModelFolderError, match="does not exist"):
        read_model_folder(tmp_path / "nowhere")


def test_per_token_outputs_are_copies_out_of_the_arena(minilm):
    # The arena reuses its memory for the next batch: a per-token answer must not point into it.
    embedder, tokenizer, _ = minilm
    assert embedder.arena is not None
    ids = [e.ids for e in tokenizer.encode(["a short input", "a second, somewhat longer input to embed"])]
    first = embedder.embed(ids, [True, False])
    kept = first[0].copy()
    assert first[0].shape == (len(ids[0]), embedder.dim) and first[1].shape == (embedder.dim,)
    embedder.embed([e.ids for e in tokenizer.encode(["something else entirely, to overwrite the arena"])], [True])
    np.testing.assert_array_equal(first[0], kept)
    np.testing.assert_allclose(first[1], embedder.embed(ids)[1], atol=1e-6)  # the pooled one is the usual answer
