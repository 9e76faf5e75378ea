"""Packed attention equals ordinary padded, masked attention on the real tokens."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import varlen_attention
from kernels.layernorm import add_layernorm


def test_varlen_attention_matches_padded_masked_attention():
    torch.manual_seed(0)
    heads, d, lengths = 4, 8, [1, 5, 12, 3]
    hidden = heads * d
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    qkv = torch.randn(cu[-1], 3 * hidden)
    got = varlen_attention(qkv, cu, heads)
    width = max(lengths)
    padded = torch.zeros(len(lengths), width, 3 * hidden)
    mask = torch.zeros(len(lengths), 1, 1, width, dtype=torch.bool)
    for i, n in enumerate(lengths):
        padded[i, :n] = qkv[cu[i]:cu[i + 1]]
        mask[i, ..., :n] = True
    q, k, v = (t.view(len(lengths), width, heads, d).transpose(1, 2) for t in padded.split(hidden, dim=-1))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(len(lengths), width, hidden)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(got[cu[i]:cu[i + 1]], ref[i, :n], rtol=1e-5, atol=1e-5)


def test_varlen_attention_checks_its_inputs():
    with pytest.raises(ValueError, match="qkv must be"):
        varlen_attention(torch.zeros(4, 10), [0, 4], 2)
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(torch.zeros(4, 24), [0, 3], 2)


def test_add_layernorm_uses_the_given_eps():
    x, r = torch.randn(3, 16), torch.randn(3, 16)
    w, b = torch.ones(16), torch.zeros(16)
    torch.testing.assert_close(add_layernorm(x, r, w, b, 1e-12), F.layer_norm(x + r, (16,), w, b, 1e-12))
    assert not torch.allclose(add_layernorm(x, r, w, b, 10.0), add_layernorm(x, r, w, b, 1e-12))
    with pytest.raises(ValueError):
        add_layernorm(x, r[:2], w, b, 1e-5)
