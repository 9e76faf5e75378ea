"""ModernBERT against transformers and sentence-transformers on small seeded random models (tests/modernbert_folders.py):
the packed forward (global and windowed local layers, each with its rotary base; pre-norm LayerNorms with and without
biases, GeGLU), the window of varlen_attention, the config's refusals, the folder check, and the server."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kernels import cuda
from kernels.attention import DeviceLayout, varlen_attention
from models.config import EncoderConfig, ModelFolderError
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.modernbert import PackedModernBert
from models.runtime import finish_embedding, load_model
from models.weights import load_encoder
from server.app import create_app
from tests.modernbert_folders import LOCAL_ATTENTION, modernbert_folder
from tests.mpnet_folders import texts
from tests.support import (
    ServerThread,
    bfloat16_cosine,
    folder_check_refuses,
    settings,
    truncation_served_as_encode,
    worst_per_sequence,
)

LENGTHS = (1, 2, 5, 6, 9, 10, 40, 131, 300)  # tokens: within the window (4 either side), at its edge, far beyond
BIASED = dict(norm_bias=True, attention_bias=True, mlp_bias=True, hidden_activation="gelu_pytorch_tanh")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("modernbert")
    return {"plain": modernbert_folder(root), "biased": modernbert_folder(root, "biased", seed=1, **BIASED)}


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    """[CLS] words [SEP] (a lone [CLS] for length 1)."""
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(5, 100, size=max(n - 2, 0)).tolist(), 2][:n] for n in lengths]


def _model(folder, dtype=torch.float32, **parts) -> PackedModernBert:
    """The folder's model; parts: ModernBertParts fields to change (the same weights under another window)."""
    parsed = read_model_folder(folder)
    cfg = parsed.encoder
    if parts:
        cfg = dataclasses.replace(cfg, modernbert=dataclasses.replace(cfg.modernbert, **parts))
    return load_encoder(cfg, parsed.weights).to(dtype=dtype)


def _ours(folder, seqs, dtype=torch.float32, emulated: bool = False, **parts) -> torch.Tensor:
    model = _model(folder, dtype, **parts)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(PackedBatch.from_ids(seqs, 0)).float()


def _transformers(folder, seqs, attn: str = "sdpa") -> list[torch.Tensor]:
    """Each sequence alone (no padding, no mask given): transformers makes each local layer's mask itself, from
    config.sliding_window = local_attention // 2 (|i - j| <= it; its flash path the same, as window_size)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    model = tf.ModernBertModel.from_pretrained(str(folder), attn_implementation=attn).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["plain", "biased"])
def test_packed_forward_matches_transformers(folders, kind, attn):
    seqs = _sequences()
    ref = _transformers(folders[kind], seqs, attn)
    worst = worst_per_sequence(_ours(folders[kind], seqs), ref, seqs)
    assert worst <= 2e-5, worst
    parts = read_model_folder(folders[kind]).encoder.modernbert
    assert parts.local_layers == (False, True, True, False) and parts.window == LOCAL_ATTENTION // 2
    assert parts.norm_bias == parts.attention_bias == parts.mlp_bias == (kind == "biased")


def test_the_window_is_exactly_transformers(folders):
    """The same weights with the window one token narrower or wider, or every layer global, differ from transformers
    on sequences longer than the window: the local layers' window counts."""
    seqs = _sequences((40, 131))
    ref = _transformers(folders["plain"], seqs)
    for parts in (dict(local_attention=LOCAL_ATTENTION - 2), dict(local_attention=LOCAL_ATTENTION + 2),
                  dict(local_layers=(False,) * 4)):
        assert worst_per_sequence(_ours(folders["plain"], seqs, **parts), ref, seqs) > 1e-3, parts


def test_windowed_attention_on_every_offsets_form():
    """varlen_attention's window against attention written out: each token sees the tokens at most `window` places
    from it in its own sequence, host offsets or device ones alike."""
    g = torch.Generator().manual_seed(0)
    cu = [0, 1, 4, 4 + 9, 13 + 30]
    q, k, v = (torch.randn(cu[-1], 2, 8, generator=g) for _ in range(3))
    for window in (0, 1, 4, 40):
        want = torch.empty(cu[-1], 16)
        for s, e in zip(cu[:-1], cu[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[s:e], k[s:e]) / 8 ** 0.5
            far = (torch.arange(e - s)[:, None] - torch.arange(e - s)[None, :]).abs() > window
            want[s:e] = torch.einsum("hqk,khd->qhd", scores.masked_fill(far, float("-inf")).softmax(-1), v[s:e]).reshape(e - s, 16)
        torch.testing.assert_close(varlen_attention(q, k, v, cu, window=window), want, atol=1e-5, rtol=1e-5)
        layout = DeviceLayout(torch.tensor(cu, dtype=torch.int32), 30)
        torch.testing.assert_close(varlen_attention(q, k, v, layout, window=window), want, atol=1e-5, rtol=1e-5)
    with cuda.emulation():  # the CUDA path on the emulator: nested tensors take no window, one SDPA call a sequence
        torch.testing.assert_close(varlen_attention(q, k, v, cu, window=4), varlen_attention(q, k, v, cu, window=4))
    for bad in (dict(attn_bias=torch.zeros(2, 30, 30)), dict(window=-1)):
        with pytest.raises(ValueError, match="must be >= 0"):
            varlen_attention(q, k, v, cu, **{"window": 4, **bad})


def test_the_cuda_code_path_on_the_emulator_runs_as_the_cpu_one(folders):
    seqs = _sequences((1, 7, 64))
    assert torch.allclose(_ours(folders["plain"], seqs, emulated=True), _ours(folders["plain"], seqs), atol=1e-5)


def test_bfloat16_stays_close_to_float32(folders):
    seqs = _sequences((3, 50, 200))
    assert bfloat16_cosine(lambda dtype: _ours(folders["plain"], seqs, dtype), seqs) >= 0.99


def test_sentence_transformers_folder_served_as_encode_gives(folders):
    """load_model + embed (with the memory arena, as served) against SentenceTransformer.encode, which pads its
    batches: transformers masks the padding and the window together."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((0, 3, 20, 140, 260))
    for kind, folder in folders.items():
        want = SentenceTransformer(str(folder), device="cpu").encode(sample)
        embedder, tokenizer, info = load_model(str(folder))
        ids = [e.ids for e in tokenizer.encode(sample)]
        assert ids[0] == [1, 2] and max(map(len, ids)) == 262
        got = finish_embedding(embedder.embed(ids), info.normalize)
        assert info.model_type == "modernbert" and info.pooling == "mean" and info.normalize
        assert np.abs(got - want).max() <= 2e-5, (kind, np.abs(got - want).max())


@pytest.mark.parametrize("change,needle", [
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "rope_theta": 1e5, "factor": 4.0},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "rotary scaling 'yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rotary scaling 'linear'"),
    ({"hidden_activation": "quick_gelu"}, "hidden_activation 'quick_gelu' is not supported"),
    ({"layer_types": ["full_attention", "chunked_attention", "sliding_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["full_attention"]}, "each of its 4 layers"),
    ({"num_attention_heads": 5}, "not a multiple of num_attention_heads=5"),
    ({"local_attention": -2}, "local_attention=-2"),
    ({"layer_types": None, "global_attn_every_n_layers": 0}, "global_attn_every_n_layers=0"),
])
def test_config_refuses_what_it_does_not_compute(folders, change, needle):
    cfg = json.loads((folders["plain"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=needle):
        EncoderConfig.from_dict({**cfg, **change})


def test_transformers_4_configs_parse_as_5s(folders):
    """ModernBERT-base's and gte-modernbert-base's own config.json (transformers 4.47/4.48): global_attn_every_n_layers,
    global_rope_theta and local_rope_theta at the top level, no layer_types or rope_parameters."""
    cfg = json.loads((folders["plain"] / "config.json").read_text())
    new = EncoderConfig.from_dict(cfg).modernbert
    old = {k: v for k, v in cfg.items() if k not in ("layer_types", "rope_parameters")}
    old |= {"global_attn_every_n_layers": 3, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
            "layer_norm_eps": 1e-5, "position_embedding_type": "absolute", "reference_compile": True}
    assert EncoderConfig.from_dict(old).modernbert == new
    every_other = EncoderConfig.from_dict(old | {"global_attn_every_n_layers": 2, "local_rope_theta": 5e4}).modernbert
    assert every_other.local_layers == (False, True, False, True) and every_other.local_rope_theta == 5e4


def test_folder_check_names_a_missing_or_misshaped_weight(folders, tmp_path):
    wi = load_file(str(folders["plain"] / "model.safetensors"))["layers.1.mlp.Wi.weight"]
    folder_check_refuses(folders["plain"], tmp_path, "layers.2.attn_norm.weight",
                         ("layers.1.mlp.Wi.weight", wi[:96].contiguous()),  # the gate half lost
                         r"layers.1.ffn_in.weight is \[96, 64\] in the files, \[192, 64\] by config")


@pytest.mark.parametrize("change,needle", [({"architectures": ["ModernBertForMaskedLM"]}, "ModernBertForMaskedLM is not"),
                                           ({"architectures": ["ModernBertForSequenceClassification"],
                                             "classifier_pooling": "max"}, "classifier_pooling 'max' is not")])
def test_what_the_heads_cannot_run_is_refused(folders, tmp_path, change, needle):
    headed = tmp_path / "headed"
    shutil.copytree(folders["plain"], headed)
    cfg = json.loads((headed / "config.json").read_text())
    (headed / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(ModelFolderError, match=needle):
        read_model_folder(headed)


def test_a_checkpoint_with_the_model_prefix_loads(folders, tmp_path):
    """*ForMaskedLM / *ForSequenceClassification checkpoints name the encoder's weights model.*."""
    prefixed = tmp_path / "prefixed"
    shutil.copytree(folders["plain"], prefixed)
    tensors = load_file(str(prefixed / "model.safetensors"))
    save_file({f"model.{k}": v for k, v in tensors.items()}, str(prefixed / "model.safetensors"))
    seqs = _sequences((5, 30))
    assert torch.equal(_ours(prefixed, seqs), _ours(folders["plain"], seqs))


def test_no_cuda_graphs_and_an_arena_planned_forward(folders):
    embedder, _, info = load_model(str(folders["plain"]))
    assert isinstance(embedder.encoder, PackedModernBert) and embedder.arena is not None
    assert embedder.capture_graphs(64, 4) is False and embedder.graphs is None
    assert info.max_input_length == 512 and info.dim == 64


def test_embed_over_http(folders, tmp_path):
    """TEI /embed through the real app, and truncation to max_seq_length, against SentenceTransformer.encode."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    short = modernbert_folder(tmp_path, "short", max_seq_length=24)
    sample, long_ones = texts((1, 3, 20, 150, 400)), texts((10, 40), seed=1)
    with ServerThread(create_app(settings(model={"path": str(folders["plain"]), "name": "modernbert"}))) as s, s.client() as c:
        r = c.post("/embed", json={"inputs": sample})
        info = c.get("/info").json()
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(np.array(r.json()), SentenceTransformer(str(folders["plain"]), device="cpu").encode(sample),
                               atol=2e-5)
    assert info["model_id"] == "modernbert"
    truncation_served_as_encode(short, long_ones, 24)


@pytest.mark.parametrize("pooling,overrides", [("cls", {}), ("mean", {"classifier_bias": True, "norm_bias": True,
                                                                       "classifier_activation": "silu"})])
def test_a_modernbert_reranker_scores_as_cross_encoder_does(tmp_path, pooling, overrides):
    """ModernBertForSequenceClassification (gte-reranker-modernbert-base's architecture) through /rerank: its head
    over the first token or the mean of the tokens, each with and without its biases, against CrossEncoder.predict."""
    from sentence_transformers import CrossEncoder  # noqa: PLC0415

    from tests.modernbert_folders import modernbert_reranker_folder  # noqa: PLC0415

    folder = modernbert_reranker_folder(tmp_path, pooling, **overrides)
    query, docs = "what is deep learning", [*texts((3, 30, 120), seed=2), "deep learning models embed text"]
    with ServerThread(create_app(settings(model={"path": str(folder), "name": "mb-reranker"}))) as s, s.client() as c:
        ranked = c.post("/rerank", json={"query": query, "texts": docs})
        info = c.get("/info").json()
    assert ranked.status_code == 200, ranked.text
    want = CrossEncoder(str(folder), device="cpu").predict([(query, d) for d in docs])
    got = {r["index"]: r["score"] for r in ranked.json()}
    np.testing.assert_allclose([got[i] for i in range(len(docs))], want, atol=2e-5)
    assert want.max() - want.min() > 1e-2  # the scores differ: a wrong head would show
    assert "reranker" in info["model_type"]
