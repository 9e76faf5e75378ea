"""Every CUDA kernel against its plain-torch reference on a GPU (skipped without one): fresh random
inputs over many shapes, outputs poisoned first, relative-error bounds per dtype."""

from __future__ import annotations

import pytest
import torch

from kernels.activation import bias_activation, bias_activation_reference
from kernels.attention import varlen_attention, varlen_attention_reference
from kernels.layernorm import bias_residual_layernorm, bias_residual_layernorm_reference
from kernels.qkv import split_qkv, split_qkv_reference
from kernels.softmax import masked_softmax, masked_softmax_reference

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BOUND = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def poison(*shapes, dtype):
    """Fill memory the caching allocator will hand out next with NaN, so unwritten outputs show."""
    blocks = [torch.full(s, float("nan"), dtype=dtype, device="cuda") for s in shapes]
    del blocks


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), "output has NaN/inf: a slot was never written"
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 100), (128, 384), (4096, 768), (65536, 768), (33, 1000), (512, 4096)])
def test_layernorm(dtype, rows, hidden):
    g = torch.Generator(device="cuda").manual_seed(rows * hidden)
    x, r = (torch.randn(rows, hidden, device="cuda", generator=g).to(dtype) for _ in range(2))
    b, gamma, beta = (torch.randn(hidden, device="cuda", generator=g).to(dtype) for _ in range(3))
    poison((rows, hidden), dtype=dtype)
    got = bias_residual_layernorm(x, b, r, gamma, beta, 1e-12)
    want = bias_residual_layernorm_reference(x.float(), b.float(), r.float(), gamma.float(), beta.float(), 1e-12)
    assert rel_err(got, want) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,heads,queries,keys", [(1, 1, 1, 1), (2, 12, 128, 128), (3, 4, 7, 37), (1, 2, 4, 4096), (8, 12, 64, 512)])
def test_masked_softmax(dtype, batch, heads, queries, keys):
    g = torch.Generator(device="cuda").manual_seed(keys)
    scores = (torch.randn(batch, heads, queries, keys, device="cuda", generator=g) * 4).to(dtype)
    mask = torch.rand(batch, keys, device="cuda", generator=g) > 0.3
    mask[0] = False if batch > 1 else mask[0]  # an all-masked batch row when there are several
    poison(scores.shape, dtype=dtype)
    got = masked_softmax(scores, mask, 0.125)
    want = masked_softmax_reference(scores.float(), mask, 0.125)
    assert (got.float() - want).abs().max().item() <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("rows,cols", [(1, 64), (1000, 1536), (37, 3072), (65536, 1536)])
def test_bias_activation(dtype, kind, rows, cols):
    g = torch.Generator(device="cuda").manual_seed(rows + cols)
    x = torch.randn(rows, cols, device="cuda", generator=g).to(dtype)
    b = torch.randn(cols, device="cuda", generator=g).to(dtype)
    poison((rows, cols), dtype=dtype)
    assert rel_err(bias_activation(x, b, kind), bias_activation_reference(x.float(), b.float(), kind)) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 1, 64), (300, 12, 64), (4096, 16, 64), (77, 6, 32)])
def test_split_qkv(dtype, tokens, heads, head_dim):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    qkv = torch.randn(tokens, 3 * heads * head_dim, device="cuda", generator=g).to(dtype)
    bias = torch.randn(3 * heads * head_dim, device="cuda", generator=g).to(dtype)
    poison((3, tokens, heads * head_dim), dtype=dtype)
    for got, want in zip(split_qkv(qkv, bias, heads), split_qkv_reference(qkv.float(), bias.float(), heads)):
        assert got.is_contiguous() and rel_err(got, want) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lengths", [[1], [5, 17, 3], [128] * 8, [4096], [8, 512, 64, 300, 1, 2]])
def test_varlen_attention(dtype, lengths):
    g = torch.Generator(device="cuda").manual_seed(sum(lengths))
    heads, d = 12, 64
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    q, k, v = (torch.randn(cu[-1], heads, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    got = varlen_attention(q, k, v, cu)
    want = varlen_attention_reference(q.float(), k.float(), v.float(), cu)
    assert rel_err(got, want) <= BOUND[dtype] * (3 if dtype != torch.float32 else 10)
