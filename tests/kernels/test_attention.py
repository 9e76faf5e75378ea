"""Packed attention equals ordinary padded, masked attention on the real tokens (CPU reference path)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import varlen_attention
from kernels.qkv import split_qkv


def test_varlen_attention_matches_padded_masked_attention():
    torch.manual_seed(0)
    heads, d, lengths = 4, 8, [1, 5, 12, 3]
    hidden = heads * d
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    qkv = torch.randn(cu[-1], 3 * hidden)
    got = varlen_attention(*split_qkv(qkv, None, heads), cu)
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
    q = torch.zeros(4, 2, 3)
    with pytest.raises(ValueError, match="share one"):
        varlen_attention(q, q, torch.zeros(4, 2, 4), [0, 4])
    with pytest.raises(ValueError, match="cu_seqlens"):
        varlen_attention(q, q, q, [0, 3])
    with pytest.raises(ValueError, match="qkv must be"):
        split_qkv(torch.zeros(4, 10), None, 2)
