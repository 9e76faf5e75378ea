"""A count-min sketch of key frequencies with periodic halving: TinyLFU's memory of keys a cache does not hold.

`depth` rows of `width` int32 counters (width a power of two). A key's counters are picked by `depth`
multiplicative hashes (top bits of key * an odd constant); `add` increments them, `estimate` answers
their minimum, which over-counts only by collisions. With `conservative` update (the default) `add` raises
only the counters at the key's minimum, to minimum + 1, which over-counts less (and counts a key repeated
within one call once). Every `sample` additions all counters are halved (Caffeine's reset), so the
estimates follow the recent frequency of a key rather than its lifetime count. Every operation is a
whole-batch torch op on the sketch's device.

Memory: depth * width * 4 bytes (`nbytes`).
"""

from __future__ import annotations

import torch

# Odd 64-bit multipliers (from splitmix64 / xxhash), as signed int64: products wrap modulo 2^64.
_MULTIPLIERS = [0x9FB21C651E98DF25, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9]


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


class FrequencySketch:
    """Count-min sketch with halving. width_hint: about how many keys matter (a cache's slots); the width is the
    next power of two >= width_hint * width_factor. sample_factor: halve every sample_factor * width_hint adds."""

    def __init__(self, width_hint: int, depth: int = 4, width_factor: float = 1.0, sample_factor: int = 10,
                 device: torch.device | str = "cpu", conservative: bool = True) -> None:
        if not 1 <= depth <= len(_MULTIPLIERS):
            raise ValueError(f"depth={depth} must be in [1, {len(_MULTIPLIERS)}]")
        if width_hint < 1 or width_factor <= 0 or sample_factor < 1:
            raise ValueError(f"{width_hint=}, {width_factor=}, {sample_factor=} must be positive")
        bits = max(6, (max(1, int(width_hint * width_factor)) - 1).bit_length())
        self.width, self.depth, self.shift = 1 << bits, depth, 64 - bits
        self.sample = sample_factor * width_hint
        self.added, self.conservative = 0, conservative
        self.counts = torch.zeros(depth * self.width, dtype=torch.int32, device=device)  # [depth * width]
        self._mult = torch.tensor([_signed(m) for m in _MULTIPLIERS[:depth]], dtype=torch.int64, device=device)
        self._row = torch.arange(depth, dtype=torch.int64, device=device) * self.width  # [depth] row offsets

    @property
    def nbytes(self) -> int:
        """Bytes of the counters."""
        return self.counts.nbytes

    def _index(self, keys: torch.Tensor) -> torch.Tensor:
        """Flat counter indices [..., depth] of keys [...] (int64, any shape)."""
        h = keys.unsqueeze(-1) * self._mult  # [..., depth], wraps modulo 2^64
        # the top `bits` bits (>> of a signed value sign-extends: the mask drops those bits)
        return ((h >> self.shift) & (self.width - 1)) + self._row

    def add(self, keys: torch.Tensor) -> None:
        """Count one use of each key (repeats in one call: n uses, or one with conservative update); halve every
        counter each `sample` adds."""
        if keys.numel() == 0:
            return
        idx = self._index(keys.reshape(-1))  # [n, depth]
        if self.conservative:  # raise only the counters at the minimum: less over-counting from collisions
            est = self.counts[idx].amin(dim=-1, keepdim=True) + 1  # [n, 1]
            self.counts.scatter_reduce_(0, idx.view(-1), est.expand_as(idx).reshape(-1), "amax")
        else:
            idx = idx.view(-1)
            self.counts.index_add_(0, idx, torch.ones(1, dtype=torch.int32, device=idx.device).expand(idx.numel()))
        self.added += keys.numel()
        if self.added >= self.sample:
            self.counts.bitwise_right_shift_(1)
            self.added //= 2

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """Estimated recent uses of keys [...] (int64 tensor of the same shape): the minimum of their counters."""
        return self.counts[self._index(keys)].amin(dim=-1).to(torch.int64)

    def clear(self) -> None:
        """Forget every count."""
        self.counts.zero_()
        self.added = 0
