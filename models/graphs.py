"""CUDA graphs of a model's whole forward, for the small batches where the host, not the GPU, sets the pace.

A serving batch of a few short texts keeps the GPU busy for tens of microseconds a layer, while the host
spends more launching that layer's ten or so kernels from Python (a CuPy launch measured ~40 us on an H100,
a torch op ~10 us). A CUDA graph replays the whole forward, pooling included, as one launch.

Graphs fix shapes and addresses, so each *bucket* is a graph captured over static tensors for `tokens`
packed tokens and up to `slots` sequences. A batch of t <= tokens tokens in b <= slots sequences is written
into the bucket's inputs (one pinned host-to-device copy): its sequences, then empty sequences up to `slots`,
then one "dummy" sequence of the tokens - t padding tokens (attending only among themselves, pooled into a row
that is dropped). Attention reads the offsets from the device (kernels.attention.DeviceLayout) with `tokens` as
the bound on a length, so FlashAttention's varlen grid stays fixed while the offsets change at every replay.

Bucket sizes step by 1.5x or 4/3 (32, 48, 64, 96, 128, ...), so a batch is padded by at most a third of itself;
they are captured largest first into one shared memory pool (one bucket runs at a time, from the worker
thread). Each bucket is compared once with the eager forward on a batch of its size before it serves; one that
disagrees or fails to capture turns the graphs off and the eager path serves everything. Classifier heads
and mean / CLS / last pooling are inside the graph; SPLADE and per-token outputs always run eagerly.
Graphs need the flash path (CUDA, fp16/bf16): the other attention paths read the offsets on the host, and so
does attention with MPNet's relative position bias (one SDPA call per sequence): such models run eagerly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from itertools import chain
from typing import Callable

import numpy as np
import torch

from kernels.attention import DeviceLayout
from models.encoder import ClassificationHead, PackedBatch, padded_positions

log = logging.getLogger(__name__)

Eager = Callable[[list[list[int]], list[int | None] | None], np.ndarray]


def bucket_sizes(max_tokens: int, smallest: int = 32) -> list[int]:
    """Token counts of the buckets: 2^k and 3 * 2^(k-1) from `smallest` up, and `max_tokens` last."""
    sizes, power = [], 2
    while power < max_tokens:
        sizes += [s for s in (power, 3 * power // 2) if smallest <= s < max_tokens]
        power *= 2
    return sorted(set(sizes)) + [max_tokens]


class Bucket:
    """One captured shape: `tokens` packed tokens, `slots` sequences, and one dummy sequence of padding.

    Its inputs are one int64 tensor, `meta` [4 * tokens + slots + 2]: token ids, positions, each token's
    sequence (slots for padding), token types, then the offsets of the slots and of the dummy sequence."""

    def __init__(self, tokens: int, slots: int, device: torch.device):
        self.tokens, self.slots = tokens, slots
        size = 4 * tokens + slots + 2
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.meta = torch.zeros(size, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None  # the captured forward's output, [slots + 1, dim] float32

    def fits(self, sequences: int, tokens: int) -> bool:
        return sequences <= self.slots and tokens <= self.tokens

    def stage(self, sequences: list[list[int]], segments: list[int | None] | None, position_offset: int,
              pad_position: int) -> None:
        """Write a batch into the host buffer and start its copy to the device (the caller's stream)."""
        T, S, b = self.tokens, self.slots, len(sequences)
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=b)  # [b]
        total = int(lengths.sum())
        starts = np.zeros(b + 1, dtype=np.int64)  # [b + 1]
        np.cumsum(lengths, out=starts[1:])
        within = np.arange(total, dtype=np.int64) - np.repeat(starts[:-1], lengths)  # [t] place in its sequence
        h = self.host.numpy()
        ids, pos, seq, types, cu = h[:T], h[T:2 * T], h[2 * T:3 * T], h[3 * T:4 * T], h[4 * T:]
        ids[:total] = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=total)
        ids[total:] = 0
        if position_offset and (ids[:total] == position_offset - 1).any():  # a RoBERTa padding id inside an input
            pos[:total] = padded_positions(ids[:total], starts, lengths, position_offset)
        else:
            pos[:total] = within + position_offset
        pos[total:] = pad_position
        seq[:total] = np.repeat(np.arange(b, dtype=np.int64), lengths)
        seq[total:] = S  # the dummy sequence's row
        types[:] = 0
        if segments is not None and any(s is not None for s in segments):
            second = np.array([n if s is None else s for s, n in zip(segments, lengths.tolist())], dtype=np.int64)
            types[:total] = within >= np.repeat(second, lengths)
        cu[:b + 1] = starts
        cu[b + 1:S + 1] = total  # empty slots
        cu[S + 1] = T  # the dummy sequence ends the bucket
        self.meta.copy_(self.host, non_blocking=True)


@dataclass
class GraphStats:
    """What /info reports: the buckets captured, batches that replayed one, batches too big for any."""

    buckets: list[tuple[int, int]] = field(default_factory=list)  # (tokens, slots)
    replays: int = 0
    eager: int = 0
    capture_seconds: float = 0.0
    off_reason: str | None = None


class GraphedForward:
    """The model's forward and pooling as CUDA graphs over token buckets; `run` answers a batch that fits one.

    encoder: a PackedEncoder; pooling: mean | cls | last; head: a classifier's head (its logits are the
    output) or None; eager: the same computation without graphs, to check each bucket against."""

    def __init__(self, encoder, pooling: str, head: ClassificationHead | None, position_offset: int, token_types: bool,
                 max_tokens: int, max_sequences: int, device: torch.device, eager: Eager):
        if pooling not in ("mean", "cls", "last"):
            raise ValueError(f"CUDA graphs pool mean, cls or last, not {pooling!r}")
        if getattr(encoder, "relative_attention_bias", None) is not None:  # its attention reads offsets on the host
            raise ValueError("CUDA graphs do not capture models with a relative position bias (MPNet)")
        self.encoder, self.pooling, self.head = encoder, pooling, head
        self.position_offset, self.token_types = position_offset, token_types
        self.pad_position = position_offset  # any valid position: the padding's results are dropped
        self.device, self.eager = device, eager
        self.buckets = [Bucket(t, min(max_sequences, t), device) for t in bucket_sizes(max_tokens)]
        self.stats = GraphStats()
        self.on = True

    def forward(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's forward from its `meta` to [slots + 1, dim] float32, with no host read of any value (what
        a capture records; also run eagerly to warm up and on devices without graphs)."""
        T = bucket.tokens
        m = bucket.meta
        cu = m[4 * T:]  # [slots + 2]
        batch = PackedBatch(m[:T], m[T:2 * T], DeviceLayout(cu.to(torch.int32), T), m[2 * T:3 * T],
                            m[3 * T:4 * T] if self.token_types else None)
        hidden = self.encoder(batch)  # [T, H]
        if self.head is not None or self.pooling == "cls":
            first = hidden.index_select(0, cu[:-1].clamp(max=T - 1))  # [slots + 1, H]; empty slots read any row
            return (self.head(first) if self.head is not None else first).float()
        if self.pooling == "last":
            return hidden.index_select(0, (cu[1:] - 1).clamp(min=0)).float()
        sums = torch.zeros(bucket.slots + 1, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, batch.seq_index, hidden.float())
        return sums / (cu[1:] - cu[:-1]).clamp(min=1).unsqueeze(1)

    def bucket_for(self, sequences: int, tokens: int) -> Bucket | None:
        return next((b for b in self.buckets if b.fits(sequences, tokens)), None)

    @torch.inference_mode()
    def run(self, sequences: list[list[int]], segments: list[int | None] | None = None) -> np.ndarray | None:
        """The batch's outputs [len(sequences), dim] from the smallest bucket that fits it; None when graphs are
        off or none fits (the caller runs it eagerly)."""
        bucket = self.bucket_for(len(sequences), sum(map(len, sequences))) if self.on else None
        if bucket is None or (bucket.graph is None and self.device.type == "cuda"):
            self.stats.eager += 1
            return None
        bucket.stage(sequences, segments, self.position_offset, self.pad_position)
        if bucket.graph is not None:
            bucket.graph.replay()
            out = bucket.out
        else:  # the same padded forward without a graph (the CPU: what tests check the staging with)
            out = self.forward(bucket)
        self.stats.replays += 1
        # .cpu() waits for the replay, so the host buffer is free again when this returns.
        return out[:len(sequences)].cpu().numpy()

    @torch.inference_mode()
    def capture(self, vocab: int, tolerance: float = 2e-2) -> bool:
        """Capture every bucket, largest first, into one memory pool, and check each against the eager forward. A
        bucket the device has no memory for is dropped (its batches run eagerly); any other failure, a disagreement
        above all, turns the graphs off (said in the log and stats). Returns whether they are on."""
        started = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        rng = np.random.default_rng(0)
        dropped: list[Bucket] = []
        try:
            for bucket in sorted(self.buckets, key=lambda b: b.tokens, reverse=True):
                try:
                    self._capture(bucket, example_batch(bucket, vocab, rng), pool, tolerance)
                except torch.cuda.OutOfMemoryError:
                    log.warning("CUDA graphs: no memory for the bucket of %d tokens; its batches run eagerly", bucket.tokens)
                    bucket.graph = bucket.out = None
                    dropped.append(bucket)
                    torch.cuda.empty_cache()
        except Exception as exc:  # noqa: BLE001 - any other failure: serve eagerly, say why
            self.turn_off(f"{type(exc).__name__}: {exc}")
            return False
        self.buckets = [b for b in self.buckets if b not in dropped]
        if not self.buckets:
            self.turn_off("no memory for any bucket")
            return False
        self.stats.replays = 0  # the checks' replays are not batches
        self.stats.capture_seconds = time.perf_counter() - started
        log.info("CUDA graphs: %d buckets of %d..%d tokens captured in %.2fs", len(self.buckets),
                 self.buckets[0].tokens, self.buckets[-1].tokens, self.stats.capture_seconds)
        return True

    def _capture(self, bucket: Bucket, example: list[list[int]], pool, tolerance: float) -> None:
        """Warm the bucket's forward up, capture it, and compare its replay on `example` with the eager forward."""
        bucket.stage(example, None, self.position_offset, self.pad_position)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):  # warm-up: compiles kernels, runs the one-time checks (host reads)
            for _ in range(2):
                self.forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = self.forward(bucket)
        bucket.graph, bucket.out = graph, out
        got = self.run(example)
        want = self.eager(example, None)
        err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
        if not err <= tolerance:
            raise RuntimeError(f"bucket of {bucket.tokens} tokens differs from the eager forward by "
                               f"{err:.3g} of its largest value (tolerance {tolerance})")
        self.stats.buckets.append((bucket.tokens, bucket.slots))

    def turn_off(self, reason: str) -> None:
        self.on = False
        self.stats.off_reason = reason
        for bucket in self.buckets:
            bucket.graph = bucket.out = None
        log.error("CUDA graphs off, every batch runs eagerly: %s", reason)

    def info(self) -> dict:
        s = self.stats
        return {"on": self.on, "buckets": [{"tokens": t, "sequences": n} for t, n in s.buckets], "replays": s.replays,
                "eager_batches": s.eager, "capture_seconds": round(s.capture_seconds, 3), "off_reason": s.off_reason}


def example_batch(bucket: Bucket, vocab: int, rng: np.random.Generator) -> list[list[int]]:
    """A batch that exercises a bucket's every part: up to 3 sequences over ~3/4 of its tokens (padding, empty
    slots and the dummy sequence all present where the bucket has room for them)."""
    count = max(1, min(bucket.slots, 3))
    budget = max(count, bucket.tokens * 3 // 4)
    cuts = np.sort(rng.choice(np.arange(1, budget), size=count - 1, replace=False)) if count > 1 else np.array([], dtype=np.int64)
    lengths = np.diff(np.concatenate([[0], cuts, [budget]])).tolist()
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]
