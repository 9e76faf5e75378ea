"""Variable-length self-attention over packed sequences (no padding is ever computed on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention_reference(qkv: torch.Tensor, cu_seqlens: list[int], num_heads: int) -> torch.Tensor:
    """Attention of each packed sequence with itself, one SDPA call per sequence.

    qkv: [total_tokens, 3 * hidden], the fused Q, K, V projections of all sequences back to back.
    cu_seqlens: [batch + 1] token offsets, cu_seqlens[0] == 0, cu_seqlens[-1] == total_tokens.
    Returns ctx: [total_tokens, hidden].
    """
    total, three_hidden = qkv.shape
    hidden = three_hidden // 3
    head_dim = hidden // num_heads
    # [T, 3, heads, d] -> [3, heads, T, d]: per-sequence slices are then views along T.
    qkv_h = qkv.view(total, 3, num_heads, head_dim).permute(1, 2, 0, 3)
    ctx = torch.empty(num_heads, total, head_dim, dtype=qkv.dtype, device=qkv.device)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        q, k, v = qkv_h[:, :, start:end]  # each [heads, L, d]
        ctx[:, start:end] = F.scaled_dot_product_attention(q, k, v)
    # [heads, T, d] -> [T, heads * d]
    return ctx.transpose(0, 1).reshape(total, hidden)


def varlen_attention(qkv: torch.Tensor, cu_seqlens: list[int], num_heads: int) -> torch.Tensor:
    """Dispatcher; checks shapes on entry. See varlen_attention_reference for the contract."""
    if qkv.dim() != 2 or qkv.shape[1] % 3 != 0 or (qkv.shape[1] // 3) % num_heads != 0:
        raise ValueError(f"qkv must be [tokens, 3*hidden] with hidden divisible by {num_heads=}; got {tuple(qkv.shape)}")
    if not cu_seqlens or cu_seqlens[0] != 0 or cu_seqlens[-1] != qkv.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to {qkv.shape[0]}; got {cu_seqlens[:3]}...{cu_seqlens[-1:]}")
    return varlen_attention_reference(qkv, cu_seqlens, num_heads)
