"""MPNet's relative position bias: a learned [buckets, heads] table, shared by every layer, whose row for the bucket of
(key position - query position) is added to that head's attention scores, T5-style.

Positions count within each sequence (0..len-1), so the bias of a sequence of length L is the top-left [L, L] block of
the bias for the batch's longest sequence: one [heads, Lmax, Lmax] tensor a batch serves every sequence and every
layer (kernels/attention.py slices it per sequence). It is made in the model's dtype, as transformers adds its table's
values to the scores."""

from __future__ import annotations

import math

import torch
from torch import nn

from kernels.attention import DeviceLayout
from models.config import MPNET_BUCKETS

MAX_DISTANCE = 128  # distances from here on share the last bucket of their direction
ALIGN = 8  # the bias's side is a multiple of this (see RelativePositionBias.forward)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = MPNET_BUCKETS,
                             max_distance: int = MAX_DISTANCE) -> torch.Tensor:
    """Bucket of each relative position (key - query), bidirectional: half the buckets for each sign; within a half,
    exact distances below num_buckets / 4, then logarithmically wider ones up to max_distance. The same operations as
    transformers' MPNetEncoder.relative_position_bucket (float32 log included), so the buckets agree at every edge."""
    half = num_buckets // 2
    n = -relative
    bucket = (n < 0).to(torch.long) * half
    n = torch.abs(n)
    max_exact = half // 2
    # log(0) = -inf for distance 0: cast, then discarded by the `where` below, as in transformers
    large = max_exact + (torch.log(n.float() / max_exact) / math.log(max_distance / max_exact)
                         * (half - max_exact)).to(torch.long)
    large = torch.clamp(large, max=half - 1)
    return bucket + torch.where(n < max_exact, n, large)


def longest_sequence(cu_seqlens: list[int] | DeviceLayout) -> int:
    """The longest sequence of a batch's offsets (a DeviceLayout's bound on it)."""
    if isinstance(cu_seqlens, DeviceLayout):
        return cu_seqlens.max_seqlen
    return max(end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]))


class RelativePositionBias(nn.Module):
    """weight: [buckets, heads], transformers' encoder.relative_attention_bias.weight."""

    def __init__(self, buckets: int, heads: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(buckets, heads))

    def forward(self, length: int) -> torch.Tensor:
        """The bias for sequences of up to `length` tokens, [heads, P, P] in the table's dtype: a sequence's bias is its
        top-left block. P is `length` rounded up to a multiple of 8: every stride of a block is then 8-aligned, which
        SDPA's memory-efficient CUDA kernel needs of a bias (it copies an unaligned one into a padded tensor each call)."""
        padded = -(-length // ALIGN) * ALIGN
        pos = torch.arange(padded, dtype=torch.long, device=self.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None])  # [P, P]: key - query
        # [P, P, heads] -> [heads, P, P], contiguous: each sequence's block then has unit-stride rows for SDPA
        return self.weight[buckets].permute(2, 0, 1).contiguous()
