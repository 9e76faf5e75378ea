"""The plain-torch references the CUDA kernels are checked against: their own semantics, on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.activation import bias_activation
from kernels.layernorm import bias_residual_layernorm
from kernels.qkv import split_qkv
from kernels.softmax import masked_softmax


def test_layernorm_adds_bias_and_residual_with_the_given_eps():
    x, r, b = torch.randn(3, 16), torch.randn(3, 16), torch.randn(16)
    g, beta = torch.rand(16) + 0.5, torch.randn(16)
    torch.testing.assert_close(bias_residual_layernorm(x, b, r, g, beta, 1e-12), F.layer_norm(x + b + r, (16,), g, beta, 1e-12))
    torch.testing.assert_close(bias_residual_layernorm(x, None, r, g, beta, 1e-5), F.layer_norm(x + r, (16,), g, beta, 1e-5))
    assert not torch.allclose(bias_residual_layernorm(x, b, r, g, beta, 10.0), bias_residual_layernorm(x, b, r, g, beta, 1e-12))
    with pytest.raises(ValueError):
        bias_residual_layernorm(x, b, r[:2], g, beta, 1e-5)


@pytest.mark.parametrize("kind,fn", [("gelu", lambda t: F.gelu(t)), ("gelu_new", lambda t: F.gelu(t, approximate="tanh")),
                                     ("relu", F.relu), ("silu", F.silu)])
def test_bias_activation(kind, fn):
    x, b = torch.randn(5, 7), torch.randn(7)
    torch.testing.assert_close(bias_activation(x, b, kind), fn(x + b))
    with pytest.raises(ValueError, match="unsupported activation"):
        bias_activation(x, b, "mish")


def test_masked_softmax_masks_keys_and_zeroes_empty_rows():
    scores = torch.randn(2, 3, 4, 5)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    p = masked_softmax(scores, mask, 0.5)
    ref = torch.softmax((scores[0] * 0.5).masked_fill(~mask[0], float("-inf")), dim=-1)
    torch.testing.assert_close(p[0], ref)
    assert (p[0][..., [2, 4]] == 0).all()
    assert (p[1] == 0).all()  # every key masked: zeros, not NaN
    torch.testing.assert_close(masked_softmax(scores, None, 1.0), torch.softmax(scores, dim=-1))


def test_split_qkv_adds_bias_per_column():
    tokens, heads, d = 3, 2, 4
    qkv, bias = torch.randn(tokens, 3 * heads * d), torch.randn(3 * heads * d)
    q, k, v = split_qkv(qkv, bias, heads)
    full = (qkv + bias).view(tokens, 3, heads, d)
    torch.testing.assert_close(q, full[:, 0])
    torch.testing.assert_close(v, full[:, 2])
    assert q.shape == (tokens, heads, d)
