"""Mistral- and Llama-based decoder-only embedders (e5-mistral-7b-instruct's, SFR-Embedding-Mistral's architecture)
against transformers and sentence-transformers on small seeded random models (tests/mistral_folders.py): the packed
forward with grouped-query attention, Llama's attention and feed-forward biases and explicit head_dim, Mistral's
sliding window computed exactly past the window (causal attention within it, on every attention path), the config's
refusals, and transformers 4's config layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kernels import cuda
from kernels.attention import DeviceLayout, varlen_attention
from models.config import EncoderConfig, ModelFolderError
from models.encoder import PackedBatch
from models.folder import read_model_folder
from models.runtime import load_model
from models.weights import load_encoder
from tests.mistral_folders import mistral_folder
from tests.mpnet_folders import texts
from tests.qwen_folders import QUERY_PROMPT
from tests.support import causal_lm_copy, worst_per_sequence

LENGTHS = (1, 2, 9, 17, 40, 131, 300)  # tokens, <|endoftext|> included; the windowed model's window is 16
WINDOW = 16  # the windowed Mistral's sliding_window: each token sees itself and the 15 before it
# name -> (model_type, config keys): Mistral as transformers makes it (sliding_window 4096, the whole 4096 positions),
# one with a window shorter than most inputs, a plain Llama, and one with every bias and head_dim * heads != hidden
KINDS = {"mistral": ("mistral", {}), "mistral_window": ("mistral", {"sliding_window": WINDOW}),
         "llama": ("llama", {}), "llama_bias": ("llama", {"attention_bias": True, "mlp_bias": True, "head_dim": 32})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral")
    return {name: mistral_folder(root, kind, name=name, seed=i, **config)
            for i, (name, (kind, config)) in enumerate(KINDS.items())}


def _sequences(lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(4, 70, size=n - 1).tolist(), 0] for n in lengths]


def _ours(folder, seqs, emulated: bool = False) -> torch.Tensor:
    parsed = read_model_folder(folder)
    model = load_encoder(parsed.encoder, parsed.weights)
    with torch.inference_mode(), cuda.emulation(emulated):
        return model(PackedBatch.from_ids(seqs, 0)).float()


def _transformers(folder, seqs) -> list[torch.Tensor]:
    """Each sequence alone (no padding, no mask), through transformers' SDPA attention."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    model = (tf.MistralModel if kind == "mistral" else tf.LlamaModel).from_pretrained(str(folder), attn_implementation="sdpa")
    with torch.inference_mode():
        return [model.eval()(input_ids=torch.tensor([s])).last_hidden_state[0] for s in seqs]


def _with_config(folder, tmp_path, **changes):
    """A copy of the folder with config.json's keys changed."""
    copy = tmp_path / f"{folder.name}-changed"
    shutil.copytree(folder, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, **changes}))
    return copy


@pytest.mark.parametrize("name", list(KINDS))
def test_packed_forward_matches_transformers(folders, name):
    seqs = _sequences()
    worst = worst_per_sequence(_ours(folders[name], seqs), _transformers(folders[name], seqs), seqs)
    assert worst <= 2e-5, worst
    parts = read_model_folder(folders[name]).encoder.decoder
    assert parts.num_kv_heads == 2 and not parts.qk_norm  # grouped-query attention is exercised
    assert (parts.qkv_bias, parts.out_bias, parts.mlp_bias) == ((name == "llama_bias",) * 3)
    assert parts.head_dim == (32 if name == "llama_bias" else 16)
    # transformers' default 4096 spans all 4096 positions: no window to compute
    assert parts.window == (WINDOW - 1 if name == "mistral_window" else None)


def test_the_sliding_window_is_computed_past_it_not_capped(folders, tmp_path):
    """Tokens past the window differ from plain causal attention's (the window matters on these weights), tokens within
    it do not; the served length stays sentence-transformers' max_seq_length, above the window."""
    seqs = _sequences((WINDOW, 40, 131))
    windowed = _ours(folders["mistral_window"], seqs)
    causal = _ours(_with_config(folders["mistral_window"], tmp_path, sliding_window=None), seqs)
    starts = np.cumsum([0, *map(len, seqs)])[:-1]
    within = torch.cat([torch.arange(s, s + WINDOW) for s in starts])
    beyond = torch.cat([torch.arange(s + WINDOW, s + len(q)) for s, q in zip(starts, seqs)])
    torch.testing.assert_close(windowed[within], causal[within], atol=1e-5, rtol=1e-5)
    assert (windowed[beyond] - causal[beyond]).abs().amax(dim=1).min() > 1e-3
    _, _, info = load_model(str(folders["mistral_window"]), memory_arena=False)
    assert info.max_input_length == 512 and read_model_folder(folders["mistral_window"]).encoder.max_input_length == 4096


@pytest.mark.parametrize("name", ["mistral_window", "llama_bias"])
def test_models_loading_embeds_as_sentence_transformers_encodes(folders, name):
    """load_model's embedder (the arena-planned forward), last-token pooled, normalised: SentenceTransformer.encode's
    vectors, with and without the query prompt, on texts shorter and far longer than the window."""
    from sentence_transformers import SentenceTransformer  # noqa: PLC0415

    sample = texts((1, 3, 12, 20, 150))
    embedder, tokenizer, info = load_model(str(folders[name]))
    assert embedder.arena is not None and info.pooling == "last" and info.normalize
    st = SentenceTransformer(str(folders[name]), device="cpu")
    for prompt in ("", QUERY_PROMPT):
        ids = [e.ids for e in tokenizer.encode([prompt + t for t in sample])]
        assert max(map(len, ids)) > 5 * WINDOW
        ours = embedder.embed(ids)
        ours /= np.linalg.norm(ours, axis=1, keepdims=True)
        np.testing.assert_allclose(ours, st.encode(sample, prompt=prompt or None), atol=2e-5)


def test_the_windowed_model_runs_the_emulated_cuda_path_as_the_cpu_one(folders):
    """Under the CUDA emulator, causal attention within a window takes one SDPA call a sequence (no nested tensors)."""
    seqs = _sequences((1, 7, 64))
    got = _ours(folders["mistral_window"], seqs, emulated=True)
    torch.testing.assert_close(got, _ours(folders["mistral_window"], seqs), atol=1e-5, rtol=1e-5)


def test_a_causal_lm_checkpoint_with_biases_loads_without_its_lm_head(folders, tmp_path):
    """LlamaForCausalLM's names: a `model.` prefix before every layer's, biases included."""
    lm = causal_lm_copy(folders["llama_bias"], tmp_path / "lm")
    seqs = _sequences((5, 30))
    assert torch.equal(_ours(lm, seqs), _ours(folders["llama_bias"], seqs))


@pytest.mark.parametrize("kind,change,needle", [
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 8.0}}, "rotary scaling 'dynamic'"),
    ("mistral", {"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_parameters": None}, "rotary scaling 'yarn'"),
    ("mistral", {"is_causal": False}, "bidirectional Mistral"),
    ("mistral", {"sliding_window": 0}, "sliding_window=0 must be a whole number >= 1"),
    ("llama", {"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
])
def test_config_refuses_what_the_decoder_does_not_compute(folders, kind, change, needle):
    cfg = json.loads((folders["mistral_window" if kind == "mistral" else "llama"] / "config.json").read_text())
    with pytest.raises(ModelFolderError, match=needle):
        EncoderConfig.from_dict({**cfg, **change})


def test_transformers_4_configs_parse_as_5s(folders):
    """e5-mistral-7b-instruct's own config.json (transformers 4.34) names rope_theta at the top level, its sliding
    window 4096 within 32768 positions; a Llama's of transformers 4, no head_dim."""
    cfg = json.loads((folders["mistral"] / "config.json").read_text())
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "head_dim")}
    e5 = EncoderConfig.from_dict(old | {"rope_theta": 10000.0, "sliding_window": 4096, "max_position_embeddings": 32768})
    assert (e5.decoder.rope_theta, e5.decoder.window, e5.max_input_length, e5.decoder.head_dim) == (1e4, 4095, 32768, 16)
    assert EncoderConfig.from_dict(old | {"sliding_window": None}).decoder.window is None
    llama = json.loads((folders["llama_bias"] / "config.json").read_text())
    parsed = EncoderConfig.from_dict({k: v for k, v in llama.items() if k != "rope_parameters"} | {"rope_theta": 5e5})
    assert (parsed.decoder.rope_theta, parsed.decoder.qkv_bias, parsed.decoder.mlp_bias) == (5e5, True, True)


def _windowed_causal(q, k, v, cu, window) -> torch.Tensor:
    """The plain math: each token over itself and the `window` tokens before it in its sequence."""
    heads, d = q.shape[1:]
    want = torch.empty(cu[-1], heads * d, dtype=torch.float32, device=q.device)
    for s, e in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k[s:e].float()) / d ** 0.5
        distance = torch.arange(e - s, device=q.device)[:, None] - torch.arange(e - s, device=q.device)[None, :]
        scores.masked_fill_((distance < 0) | (distance > window), float("-inf"))
        want[s:e] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[s:e].float()).reshape(e - s, heads * d)
    return want


def test_causal_attention_within_a_window_on_every_offsets_form():
    g = torch.Generator().manual_seed(0)
    cu = [0, 1, 6, 6 + 19]
    q, k, v = (torch.randn(cu[-1], 2, 8, generator=g) for _ in range(3))
    want = _windowed_causal(q, k, v, cu, 4)
    torch.testing.assert_close(varlen_attention(q, k, v, cu, causal=True, window=4), want, atol=1e-5, rtol=1e-5)
    layout = DeviceLayout(torch.tensor(cu, dtype=torch.int32), 20)
    torch.testing.assert_close(varlen_attention(q, k, v, layout, causal=True, window=4), want, atol=1e-5, rtol=1e-5)
    assert (varlen_attention(q, k, v, cu, causal=True) - want).abs().max() > 1e-2  # the window cut something
    with pytest.raises(ValueError, match="without an additive bias"):
        varlen_attention(q, k, v, cu, attn_bias=torch.zeros(2, 19, 19), window=4)
