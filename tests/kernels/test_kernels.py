"""Every CUDA kernel against its plain-torch reference, fresh random inputs over many shapes, outputs poisoned
(NaN) first, relative-error bounds per dtype. Each case runs twice: on a GPU ("cuda", gpu marker, skipped
without one) and on the CPU emulator ("emulated", kernels/emulate.py: the same CUDA source, each thread of
a warp a fiber), which runs everywhere, CI included, on the shapes small enough for it."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.activation import bias_activation, bias_activation_reference
from kernels.attention import (
    flash_agrees,
    flash_eligible,
    varlen_attention,
    varlen_attention_flash,
    varlen_attention_nested,
    varlen_attention_reference,
)
from kernels.layernorm import bias_residual_layernorm, bias_residual_layernorm_reference
from kernels.qkv import split_qkv, split_qkv_reference
from kernels.softmax import masked_softmax, masked_softmax_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BOUND = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# Elements: what the emulator runs in about a second. EMULATED_MAX_ELEMENTS=60000000 runs (almost) the GPU's
# shapes on the emulator too, in minutes (bench/RESULTS.md, section 3).
EMULATED_MAX = int(os.environ.get("EMULATED_MAX_ELEMENTS", 400_000))


def cases(shapes: list[tuple], size) -> list:
    """Every shape on the GPU; on the emulator those with size(shape) <= EMULATED_MAX."""
    gpu = [pytest.param("cuda", *s, marks=pytest.mark.gpu, id=f"cuda-{'-'.join(map(str, s))}") for s in shapes]
    emulated = [pytest.param("emulated", *s, id=f"emulated-{'-'.join(map(str, s))}") for s in shapes
                if size(*s) <= EMULATED_MAX]
    return gpu + emulated


def poisoned(shape, dtype, device) -> torch.Tensor:
    """An output buffer full of NaN: a slot the kernel never writes shows in rel_err."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all(), "output has NaN/inf: a slot was never written"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,rows,hidden", cases([(1, 64), (7, 100), (128, 384), (4096, 768), (65536, 768), (33, 1000),
                                                     (512, 4096), (5, 1), (3, 31), (2, 33)], lambda r, h: r * h))
def test_layernorm(kernel_device, where, dtype, rows, hidden):
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(rows * hidden)
    x, r = (torch.randn(rows, hidden, device=device, generator=g).to(dtype) for _ in range(2))
    b, gamma, beta = (torch.randn(hidden, device=device, generator=g).to(dtype) for _ in range(3))
    out = poisoned((rows, hidden), dtype, device)
    got = bias_residual_layernorm(x, b, r, gamma, beta, 1e-12, out=out)
    want = bias_residual_layernorm_reference(x.float(), b.float(), r.float(), gamma.float(), beta.float(), 1e-12)
    assert got.data_ptr() == out.data_ptr() and rel_err(got, want) <= BOUND[dtype]
    # without a bias, into a new tensor
    want = bias_residual_layernorm_reference(x.float(), None, r.float(), gamma.float(), beta.float(), 1e-5)
    assert rel_err(bias_residual_layernorm(x, None, r, gamma, beta, 1e-5), want) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,batch,heads,queries,keys", cases(
    [(1, 1, 1, 1), (2, 12, 128, 128), (3, 4, 7, 37), (1, 2, 4, 4096), (8, 12, 64, 512), (2, 3, 5, 33)],
    lambda b, h, q, k: b * h * q * k))
def test_masked_softmax(kernel_device, where, dtype, batch, heads, queries, keys):
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(keys)
    scores = (torch.randn(batch, heads, queries, keys, device=device, generator=g) * 4).to(dtype)
    mask = torch.rand(batch, keys, device=device, generator=g) > 0.3
    mask[0] = False if batch > 1 else mask[0]  # an all-masked batch row when there are several
    got = masked_softmax(scores, mask, 0.125, out=poisoned(scores.shape, dtype, device))
    want = masked_softmax_reference(scores.float(), mask, 0.125)
    assert torch.isfinite(got).all()
    assert (got.float().cpu() - want.cpu()).abs().max().item() <= BOUND[dtype]
    unmasked = masked_softmax_reference(scores.float(), None, 0.125)
    assert (masked_softmax(scores, None, 0.125).float().cpu() - unmasked.cpu()).abs().max().item() <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("where,rows,cols", cases([(1, 64), (1000, 1536), (37, 3072), (65536, 1536), (3, 5)],
                                                  lambda r, c: r * c * 2))  # two launches a case
def test_bias_activation(kernel_device, where, dtype, kind, rows, cols):
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(rows + cols)
    x = torch.randn(rows, cols, device=device, generator=g).to(dtype)
    b = torch.randn(cols, device=device, generator=g).to(dtype)
    got = bias_activation(x, b, kind, out=poisoned((rows, cols), dtype, device))
    assert rel_err(got, bias_activation_reference(x.float(), b.float(), kind)) <= BOUND[dtype]
    want = bias_activation_reference(x.float(), None, kind)
    assert rel_err(bias_activation(x, None, kind, out=x), want) <= BOUND[dtype]  # in place, as the encoder runs it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,tokens,heads,head_dim", cases([(1, 1, 64), (300, 12, 64), (4096, 16, 64), (77, 6, 32)],
                                                             lambda t, h, d: t * h * d * 3))
def test_split_qkv(kernel_device, where, dtype, tokens, heads, head_dim):
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * heads * head_dim, device=device, generator=g).to(dtype)
    bias = torch.randn(3 * heads * head_dim, device=device, generator=g).to(dtype)
    out = poisoned((3, tokens, heads * head_dim), dtype, device)
    for got, want in zip(split_qkv(qkv, bias, heads, out=out), split_qkv_reference(qkv.float(), bias.float(), heads)):
        assert got.is_contiguous() and rel_err(got, want) <= BOUND[dtype]
    for got, want in zip(split_qkv(qkv, None, heads), split_qkv_reference(qkv.float(), None, heads)):
        assert got.is_contiguous() and rel_err(got, want) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where,lengths", cases([([1],), ([5, 17, 3],), ([128] * 8,), ([4096],), ([8, 512, 64, 300, 1, 2],)],
                                                lambda lengths: sum(lengths) * 12 * 64 * 8))
def test_varlen_attention(kernel_device, where, dtype, lengths):
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(sum(lengths))
    heads, d = 12, 64
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], heads, d, device=device, generator=g).to(dtype) for _ in range(3))
    got = varlen_attention(q, k, v, cu, out=poisoned((cu[-1], heads * d), dtype, device))
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    assert rel_err(got, want) <= BOUND[dtype] * (3 if dtype != torch.float32 else 10)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads,d", [(12, 32), (12, 64), (16, 128)])
def test_each_cuda_attention_path_against_the_reference(dtype, heads, d):
    """The dispatcher falls back quietly, so each CUDA path is checked by name: FlashAttention's varlen kernel (taken
    for these heads: MiniLM's 32, BERT's 64) and nested tensors, on mixed lengths, into a poisoned buffer."""
    lengths = [1, 7, 64, 300, 2, 511, 33]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(cu[-1], heads, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    assert flash_eligible(q) and flash_agrees(q.device, dtype, d)
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    for path in (varlen_attention_flash, varlen_attention_nested):
        got = path(q, k, v, cu, out=poisoned((cu[-1], heads * d), dtype, "cuda"))
        assert rel_err(got, want) <= BOUND[dtype] * 3, path.__name__
    # causal (decoder-only embedders): the flash kernel's own mask, against one SDPA call a sequence
    assert flash_agrees(q.device, dtype, d, causal=True)
    got = varlen_attention_flash(q, k, v, cu, out=poisoned((cu[-1], heads * d), dtype, "cuda"), causal=True)
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, causal=True)
    assert rel_err(got, want) <= BOUND[dtype] * 3
    # a window (ModernBERT's local layers, 64 tokens either side): the flash kernel's own, against a band mask
    assert flash_agrees(q.device, dtype, d, window=64)
    got = varlen_attention_flash(q, k, v, cu, out=poisoned((cu[-1], heads * d), dtype, "cuda"), window=64)
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, window=64)
    assert rel_err(got, want) <= BOUND[dtype] * 3
    # causal within a window (Mistral's sliding window: itself and the 31 tokens before), and through the dispatcher
    assert flash_agrees(q.device, dtype, d, causal=True, window=31)
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, causal=True, window=31)
    for path in (varlen_attention_flash, varlen_attention):
        got = path(q, k, v, cu, out=poisoned((cu[-1], heads * d), dtype, "cuda"), causal=True, window=31)
        assert rel_err(got, want) <= BOUND[dtype] * 3, path.__name__


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", [pytest.param("cuda", marks=pytest.mark.gpu), "emulated"])
def test_unaligned_rows_take_the_scalar_kernels_and_agree(kernel_device, where, dtype):
    """LayerNorm and softmax load 16-byte packs only from 16-byte aligned rows: views starting one element in take
    the scalar kernels, with the same results as the aligned (packed) calls."""
    device = kernel_device
    g = torch.Generator(device=device).manual_seed(7)
    rows, hidden = 9, 136
    flat = torch.randn(2 * rows * hidden + 1, device=device, generator=g).to(dtype)
    x, r = flat[1:rows * hidden + 1].view(rows, hidden), flat[rows * hidden + 1:].view(rows, hidden)  # misaligned
    b, gamma, beta = (torch.randn(hidden, device=device, generator=g).to(dtype) for _ in range(3))
    unaligned = bias_residual_layernorm(x, b, r, gamma, beta, 1e-12)
    packed = bias_residual_layernorm(x.clone(), b, r.clone(), gamma, beta, 1e-12)
    want = bias_residual_layernorm_reference(x.float(), b.float(), r.float(), gamma.float(), beta.float(), 1e-12)
    assert x.data_ptr() % 16 and rel_err(unaligned, want) <= BOUND[dtype] and rel_err(packed, want) <= BOUND[dtype]
    scores = flat[1:1 + 2 * 3 * 4 * 64].view(2, 3, 4, 64)
    mask = torch.rand(2, 64, device=device, generator=g) > 0.3
    want = masked_softmax_reference(scores.float(), mask, 0.125)
    for got in (masked_softmax(scores, mask, 0.125), masked_softmax(scores.clone(), mask, 0.125)):
        assert (got.float().cpu() - want.cpu()).abs().max().item() <= BOUND[dtype]
    # QKV split: packs on the aligned copy, scalars on the view (rows of 3 x 136 start one element in)
    qkv = flat[1:1 + 5 * 3 * hidden].view(5, 3 * hidden)
    bq = torch.randn(3 * hidden, device=device, generator=g).to(dtype)
    want = split_qkv_reference(qkv.float(), bq.float(), 2)
    for got in (split_qkv(qkv, bq, 2), split_qkv(qkv.clone(), bq, 2)):
        assert all(rel_err(a, b) <= BOUND[dtype] for a, b in zip(got, want))
    # bias + activation: packs on the aligned copy, scalars on the view
    want = bias_activation_reference(x.float(), b.float(), "gelu")
    for got in (bias_activation(x, b, "gelu"), bias_activation(x.clone(), b, "gelu")):
        assert rel_err(got, want) <= BOUND[dtype]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_kernels_launch_directly_on_the_gpu():
    """The start-up probe passes (every argument width echoed through cuLaunchKernel with a parameter block), so
    launches take the direct path, not CuPy's launcher; and a launch from a fresh thread works too."""
    import threading  # noqa: PLC0415

    from kernels import cuda  # noqa: PLC0415

    assert cuda._direct_launch_ok(torch.cuda.current_device())
    results = []

    def other_thread():
        x = torch.randn(64, 384, device="cuda", dtype=torch.float16)
        b = torch.randn(384, device="cuda", dtype=torch.float16)
        results.append(rel_err(bias_activation(x, b, "gelu"), bias_activation_reference(x.float(), b.float(), "gelu")))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert results and results[0] <= BOUND[torch.float16]
