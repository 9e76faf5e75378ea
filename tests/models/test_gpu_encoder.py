"""The whole encoder on a GPU in fp16/bf16 against the CPU fp32 model on the same weights (skipped
without a GPU); and its CUDA code path (fused kernels, nested attention) on the CPU emulator
(kernels/emulate.py) in fp32, fp16 and bf16 against the CPU path, everywhere. Weights are seeded random,
built from a config: nothing is downloaded."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch

from kernels import cuda, emulate
from models.arch_config import DecoderParts, ModernBertParts
from models.config import EncoderConfig
from models.decoder import PackedDecoder
from models.encoder import PackedBatch, PackedEncoder, pool
from models.modernbert import PackedModernBert
from models.rotary_bert import PackedRotaryBert
from models.rotary_bert_config import RotaryBertParts

CONFIGS = {
    "minilm-l6": dict(hidden_size=384, num_heads=12, num_layers=6, intermediate_size=1536),
    "bert-base": dict(hidden_size=768, num_heads=12, num_layers=12, intermediate_size=3072),
    # all-mpnet-base-v2's shape: attention with a relative position bias (one SDPA call a sequence, no graphs)
    "mpnet-base": dict(hidden_size=768, num_heads=12, num_layers=12, intermediate_size=3072, model_type="mpnet",
                       relative_attention_buckets=32),
}


def random_encoder(name: str, seed: int = 0) -> PackedEncoder:
    shape = {"model_type": "bert", **CONFIGS[name]}
    cfg = EncoderConfig(vocab_size=30522, max_positions=512, type_vocab_size=2, layer_norm_eps=1e-12, activation="gelu",
                        **shape)
    torch.manual_seed(seed)
    model = PackedEncoder(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    for layer in model.layers:  # LayerNorm scales near 1, as trained models have them
        layer.attn_norm.weight.data.add_(1.0)
        layer.ffn_norm.weight.data.add_(1.0)
    model.embed_norm.weight.data.add_(1.0)
    return model.eval()


def cosines(model: PackedEncoder, ref: PackedEncoder, seqs: list[list[int]], device: str, emulated: bool = False) -> np.ndarray:
    """Cosine of each sequence's mean-pooled embedding: `model` on `device` (the CPU emulator's when `emulated`)
    against `ref` on the CPU path."""
    with torch.inference_mode():
        want = pool(ref(PackedBatch.from_ids(seqs, 0)), PackedBatch.from_ids(seqs, 0), "mean").numpy()
        batch = PackedBatch.from_ids(seqs, 0, device)
        with cuda.emulation(emulated):
            got = pool(model(batch), batch, "mean").cpu().numpy()
    return (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


def random_seqs(lengths, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(1000, 29000) for _ in range(n)] for n in lengths]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gpu_encoder_matches_cpu_fp32(name, dtype):
    cpu = random_encoder(name)
    cosine = cosines(copy.deepcopy(cpu).to("cuda", dtype), cpu, random_seqs((1, 8, 77, 128, 300, 512, 33)), "cuda")
    assert cosine.min() >= 0.999, cosine


def _seeded(kind, cfg: EncoderConfig, seed: int):
    """kind(cfg) with seeded random weights: norm weights near 1 (std 0.05), the rest std 0.02, as trained ones."""
    torch.manual_seed(seed)
    model = kind(cfg)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, mean=1.0 if "norm" in name else 0.0, std=0.05 if "norm" in name else 0.02)
    return model.eval()


def random_decoder(seed: int = 0) -> PackedDecoder:
    """Qwen3-Embedding-0.6B's shape (grouped-query attention, 16 query heads of 128 over 8 key/value heads, per-head
    RMSNorm of queries and keys), 4 of its 28 layers."""
    cfg = EncoderConfig("qwen3", vocab_size=151669, hidden_size=1024, num_heads=16, num_layers=4, intermediate_size=3072,
                        max_positions=32768, type_vocab_size=0, layer_norm_eps=1e-6, activation="silu",
                        decoder=DecoderParts(num_kv_heads=8, head_dim=128, rope_theta=1e6, qk_norm=True))
    return _seeded(PackedDecoder, cfg, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_decoder_matches_cpu_fp32(dtype):
    """Causal attention through the flash kernel's own mask (or one SDPA call a sequence), on the GPU."""
    cpu = random_decoder()
    cosine = cosines(copy.deepcopy(cpu).to("cuda", dtype), cpu, random_seqs((1, 8, 77, 300, 512, 33)), "cuda")
    assert cosine.min() >= 0.999, cosine


def random_modernbert(seed: int = 0) -> PackedModernBert:
    """ModernBERT-base's shape (gte-modernbert-base, modernbert-embed-base: 12 heads of 64, GeGLU of 1152, local
    layers seeing 64 tokens either side, every third layer global), 6 of its 22 layers: global, local, local, ..."""
    cfg = EncoderConfig("modernbert", vocab_size=50368, hidden_size=768, num_heads=12, num_layers=6, intermediate_size=1152,
                        max_positions=8192, type_vocab_size=0, layer_norm_eps=1e-5, activation="gelu",
                        modernbert=ModernBertParts(local_layers=tuple(bool(i % 3) for i in range(6)), local_attention=128))
    return _seeded(PackedModernBert, cfg, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_modernbert_matches_cpu_fp32(dtype):
    """Local layers' windowed attention through the flash kernel's window (or one SDPA call a sequence with a band
    mask), global ones through the plain flash kernel, on the GPU; sequences shorter and longer than the window."""
    cpu = random_modernbert()
    cosine = cosines(copy.deepcopy(cpu).to("cuda", dtype), cpu, random_seqs((1, 8, 77, 129, 300, 512, 33)), "cuda")
    assert cosine.min() >= 0.999, cosine


def random_rotary_bert(kind: str, seed: int = 0) -> PackedRotaryBert:
    """nomic-embed-text-v1.5's shape (no biases, SwiGLU, two token types, rotary base 1000) or gte-base-en-v1.5's
    (biases, GeGLU, no token types, NTK-scaled rotary base 500000 by 2), 6 of their 12 layers."""
    nomic = kind == "nomic"
    parts = RotaryBertParts(rope_theta=1000.0) if nomic else RotaryBertParts(
        rope_theta=1e6, rope_scale=2 ** (2 / 64), qkv_bias=True, out_bias=True, down_bias=True)
    cfg = EncoderConfig("nomic_bert" if nomic else "gte", vocab_size=30528, hidden_size=768, num_heads=12, num_layers=6,
                        intermediate_size=3072, max_positions=8192, type_vocab_size=2 if nomic else 0,
                        layer_norm_eps=1e-12, activation="silu" if nomic else "gelu", rotary=parts)
    return _seeded(PackedRotaryBert, cfg, seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["nomic", "gte"])
def test_gpu_rotary_bert_matches_cpu_fp32(kind, dtype):
    """NomicBERT and GTE: rotary positions, the gated feed-forward and the fused bias + residual + LayerNorm kernel."""
    cpu = random_rotary_bert(kind)
    cosine = cosines(copy.deepcopy(cpu).to("cuda", dtype), cpu, random_seqs((1, 8, 77, 300, 512, 1000, 33)), "cuda")
    assert cosine.min() >= 0.999, cosine


@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
@pytest.mark.parametrize("dtype,bound", [(torch.float32, 0.99999), (torch.float16, 0.999), (torch.bfloat16, 0.999)], ids=str)
def test_cuda_code_path_on_the_emulator_matches_the_cpu_path(dtype, bound):
    cpu = random_encoder("minilm-l6")
    seqs = random_seqs((1, 8, 77, 33, 2))
    before = emulate.launches.copy()
    cosine = cosines(copy.deepcopy(cpu).to(dtype=dtype), cpu, seqs, "cpu", emulated=True)
    assert cosine.min() >= bound, cosine
    # every fused kernel of a layer ran, once a layer (layer norms twice, + embeddings); the packed (16-byte) variants,
    # the encoder's rows being aligned and a multiple of the pack
    ran = emulate.launches - before
    assert ran == {"split_qkv_vec": 6, "bias_activation_vec": 6, "bias_residual_layernorm_vec": 13}, ran


@pytest.mark.skipif(emulate.compiler() is None, reason="no C++ compiler for the emulator")
def test_memory_arena_plans_the_cuda_code_path():
    """The arena records the CUDA path's intermediates (jagged nested tensors for attention included: recording
    them once disabled nested attention and failed the load) and its planned batches compute what fresh
    allocations compute, bit for bit, per-token outputs copied out of the arena."""
    from kernels import attention  # noqa: PLC0415
    from models.runtime import load_model  # noqa: PLC0415

    attention._nested_failed = False
    seqs = random_seqs((3, 40, 17, 1, 64), seed=2)
    with cuda.emulation():
        planned, _, _ = load_model(None, dtype="float16")
        fresh, _, _ = load_model(None, dtype="float16", memory_arena=False)
        assert planned.arena is not None and not attention._nested_failed
        for flags in (None, [True, False, True, False, True]):
            a, b = planned.embed(seqs, flags), fresh.embed(seqs, flags)
            for x, y in zip(a, b):
                assert np.array_equal(x, y)
        per_token = planned.embed(seqs, [True] * 5)
        planned.embed(random_seqs((64, 64, 64), seed=3))  # reuses the arena's memory
        assert all(np.array_equal(x, y) for x, y in zip(per_token, fresh.embed(seqs, [True] * 5)))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_splade_head_on_the_gpu_matches_cpu_fp32(dtype):
    """SPLADE pooling (models/encoder.py SpladeHead: chunked MLM logits, scatter-max per sequence) on CUDA in half
    precision, over the GPU encoder's states, against the CPU fp32 model: the same words weigh, close."""
    from models.encoder import SpladeHead  # noqa: PLC0415

    cpu = random_encoder("minilm-l6")
    torch.manual_seed(2)
    head = SpladeHead(384, 30522, "gelu", 1e-12).eval()
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.05)
    seqs = random_seqs((1, 8, 300, 600 - 300, 33))
    with torch.inference_mode():
        batch = PackedBatch.from_ids(seqs, 0)
        want = head(cpu(batch), batch).numpy()
        gpu_batch = PackedBatch.from_ids(seqs, 0, "cuda")
        got = copy.deepcopy(head).to("cuda", dtype)(copy.deepcopy(cpu).to("cuda", dtype)(gpu_batch), gpu_batch).cpu().numpy()
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=0.05, rtol=0.05)
    strong = want > 0.1
    assert strong.any() and (got[strong] > 0).all()
