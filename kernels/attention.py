"""Variable-length self-attention over packed sequences (no padding is ever computed on).

On CUDA (fp16/bf16, head size a multiple of 8 up to 256, sm80+) the packed Q, K, V and cu_seqlens go
straight to FlashAttention-2's variable-length kernel (torch's `_flash_attention_forward`, the op nested
tensors call underneath): one launch for the batch, no padding. Measured on an H100 (bench/RESULTS.md,
section 11): nested-tensor SDPA cost 3.4-3.8 ms a call whatever the batch, host bookkeeping, and one SDPA
call per sequence 50 us a sequence, both far above the kernels' own time; a hand-written CuPy attention
kernel was not attempted, FlashAttention being tiled, fused and tensor-core based already. The varlen
kernel is checked against per-sequence SDPA once per device, dtype and head size (`flash_agrees`). Then
nested tensors (other CUDA dtypes, and the CPU under the emulator), then on the CPU short sequences in padded
groups and long ones one SDPA call each (kernels/attention_groups.py), elsewhere one SDPA call per sequence.

An additive attention bias (MPNet's relative positions, `attn_bias` [heads, Lmax, Lmax], each sequence its top-left
block) takes one SDPA call per sequence on every device: neither the varlen kernel nor nested tensors take an
arbitrary bias. Attention without one never looks at it.

Causal attention (decoder-only embedders: each token sees itself and the tokens before it in its sequence) takes the
varlen kernel's own causal mask where it runs, else one SDPA call per sequence with is_causal.

Windowed attention (ModernBERT's local layers: each token sees the tokens at most `window` places from it, either
side, in its sequence) takes the varlen kernel's window_size_left/right where it runs, else one SDPA call per sequence
with a band mask. Causal attention within a window (Mistral's sliding window: each token sees itself and the `window`
tokens before it) takes both: the kernel's causal mask with window_size_left, or the band's lower half.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import cuda
from kernels.attention_groups import varlen_attention_grouped

log = logging.getLogger(__name__)
_nested_failed = False
_flash_failed = False


@dataclass(frozen=True)
class DeviceLayout:
    """Sequence offsets that are already on the device, for a forward captured in a CUDA graph (models/graphs.py):
    no host list to read, so each replay may write new offsets into the same tensor. cu: int32 [B + 1];
    max_seqlen: a bound on every sequence's length (the flash kernel sizes its grid from it; sequences of
    length 0 are allowed)."""

    cu: torch.Tensor
    max_seqlen: int


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                               out: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                               causal: bool = False, window: int | None = None) -> torch.Tensor:
    """Attention of each packed sequence with itself, one SDPA call per sequence.

    q, k, v: [total_tokens, heads, head_dim] (views are fine); cu_seqlens: [batch + 1] token offsets,
    cu_seqlens[0] == 0 and cu_seqlens[-1] == total_tokens. Returns ctx: [total_tokens, heads * head_dim],
    written into `out` when given (contiguous, that shape). attn_bias: None, or [heads, Lmax, Lmax] of q's dtype
    with Lmax >= every length, added to the scaled scores: a sequence of length L gets its [heads, :L, :L] block.
    causal: each token attends to itself and the tokens before it (not with attn_bias). window: each token attends to
    the tokens at most `window` places from it on either side (|i - j| <= window), or with causal to itself and the
    `window` tokens before it (0 <= i - j <= window); not with attn_bias.
    """
    total, heads, head_dim = q.shape
    ctx = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device) if out is None else out.view(total, heads, head_dim)
    band = None  # [Lmax, Lmax] bool: the window's mask (causal: its lower half), each sequence its top-left block
    if window is not None:
        longest = max((end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])), default=0)
        band = _band(longest, window, q.device, causal)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end == start:  # an empty slot of a CUDA graph's layout
            continue
        # [L, heads, d] -> [1, heads, L, d]: four dimensions let the CPU take its flash kernel (with three it
        # takes the math path, about 2x slower at MiniLM's shapes, whose masked-softmax checks cost as much as the bmm)
        mask = None if attn_bias is None else attn_bias[None, :, :end - start, :end - start]  # [1, heads, L, L]
        if band is not None:  # sliced whatever the length: the arena's recording needs the same torch calls
            mask = band[:end - start, :end - start]  # [L, L] bool, True where attended
            mask = mask if end - start > window + 1 else None  # every token within the window: no mask, SDPA's fast path
        out = F.scaled_dot_product_attention(q[start:end].transpose(0, 1)[None], k[start:end].transpose(0, 1)[None],
                                             v[start:end].transpose(0, 1)[None], attn_mask=mask,
                                             is_causal=causal and mask is None)  # a band mask holds the causal half
        ctx[start:end] = out[0].transpose(0, 1)
    return ctx.view(total, heads * head_dim)


def _band(longest: int, window: int, device: torch.device, causal: bool = False) -> torch.Tensor:
    """[longest, longest] bool, True where |i - j| <= window (causal: where 0 <= i - j <= window), query i, key j:
    every sequence's window mask is its top-left block."""
    pos = torch.arange(longest, device=device)
    distance = pos[:, None] - pos[None, :]  # [query, key]: i - j
    return (distance >= 0) & (distance <= window) if causal else distance.abs() <= window


@functools.lru_cache(maxsize=8)
def _batch_layout(cu_seqlens: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.int64) -> tuple[torch.Tensor, int, int]:
    """cu_seqlens on `device` and the shortest and longest sequence, once per batch rather than once per layer.
    The offsets come from pinned memory without blocking: a copy from pageable memory would wait for the stream's
    queued work, and every layer would stall the host."""
    # Out of sight of torch-function modes: only the first layer of a batch builds it, and a mode that records the
    # forward's op sequence (kernels/arena.py) must see the same sequence whether or not this cache hit.
    lengths = [end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    with torch._C.DisableTorchFunction():
        host = torch.tensor(cu_seqlens, dtype=dtype)
        offsets = host if device.type != "cuda" else host.pin_memory().to(device, non_blocking=True)
    return offsets, min(lengths), max(lengths)


def _into(ctx: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """[T, heads, d] attention output as [T, heads * d]; copied into the planned buffer `out` when one is given
    (the fused attention ops have no out=)."""
    flat = ctx.reshape(ctx.shape[0], -1)
    return flat if out is None else out.copy_(flat)


def varlen_attention_nested(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """The same through nested jagged tensors: one fused SDPA call for the whole batch."""
    total, heads, head_dim = q.shape
    offsets, shortest, longest = _batch_layout(tuple(cu_seqlens), q.device)
    # The shortest and longest lengths are known here; given, torch needs no device-to-host read to find them.
    bounds = dict(min_seqlen=shortest, max_seqlen=longest)

    def jagged(t: torch.Tensor) -> torch.Tensor:  # [T, heads, d] -> [B, heads, j, d]
        return torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets, **bounds).transpose(1, 2)

    return _into(F.scaled_dot_product_attention(jagged(q), jagged(k), jagged(v)).transpose(1, 2).values(), out)


def flash_eligible(q: torch.Tensor) -> bool:
    """Whether torch's FlashAttention-2 varlen kernel takes these heads: CUDA (sm80+), fp16/bf16, head size a
    multiple of 8 up to 256."""
    head_dim = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256
            and _sm_major(q.device.index if q.device.index is not None else torch.cuda.current_device()) >= 8)


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def varlen_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int],
                           out: torch.Tensor | None = None, causal: bool = False, window: int | None = None) -> torch.Tensor:
    """The same through FlashAttention-2's variable-length kernel (torch's aten op, the one nested tensors use
    underneath): the packed [T, heads, d] tokens and cu_seqlens go in as they are, one launch, no padding, no
    nested-tensor bookkeeping on the host. Needs `flash_eligible(q)`."""
    cu, _, longest = _batch_layout(tuple(cu_seqlens), q.device, torch.int32)
    return _flash(q, k, v, cu, longest, out, causal, window)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
           out: torch.Tensor | None, causal: bool = False, window: int | None = None) -> torch.Tensor:
    """The varlen kernel on device offsets `cu` (int32 [B + 1]) with `longest` a bound on every length. window: the
    kernel's own sliding window, `window` keys each side of the query (inclusive), as FlashAttention counts it; none
    to the right when causal."""
    sides = {} if window is None else dict(window_size_left=window, window_size_right=0 if causal else window)
    return _into(torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, causal, False,
                                                         scale=q.shape[-1] ** -0.5, **sides)[0], out)


@functools.lru_cache(maxsize=None)
def flash_agrees(device: torch.device, dtype: torch.dtype, head_dim: int, causal: bool = False,
                 window: int | None = None) -> bool:
    """Whether FlashAttention's varlen kernel gives one SDPA call per sequence's answer (to 2e-2 of the largest
    value) on small random heads of this device, dtype and head size; asked once each, at warm-up, so that a
    torch whose private op changed meaning costs speed (the nested path), never wrong embeddings. A window is checked
    as one narrower than the check's longest sequence (64), so that the kernel's windowing is exercised whatever the
    model's window (Mistral's is 4095)."""
    window = None if window is None else min(window, 13)
    with torch._C.DisableTorchFunction():  # not part of any forward a torch-function mode may be recording
        g = torch.Generator(device=device).manual_seed(head_dim)
        cu = [0, 1, 8, 45, 109]
        q, k, v = (torch.randn(cu[-1], 2, head_dim, device=device, generator=g).to(dtype) for _ in range(3))
        got = varlen_attention_flash(q, k, v, cu, causal=causal, window=window).float()
        want = varlen_attention_reference(q.float(), k.float(), v.float(), cu, causal=causal, window=window)
        err = ((got - want).abs().max() / want.abs().max()).item()
    if err > 2e-2:
        log.error("FlashAttention varlen disagrees with SDPA on %s %s head size %d%s%s (relative error %.3g): "
                  "using other attention paths", device, dtype, head_dim, " causal" if causal else "",
                  "" if window is None else f" window {window}", err)
    return err <= 2e-2


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | DeviceLayout,
                     out: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None,
                     causal: bool = False, window: int | None = None) -> torch.Tensor:
    """Dispatcher; checks shapes on entry. See varlen_attention_reference for the contract. cu_seqlens may also
    be a DeviceLayout (a CUDA graph's forward): it goes to the flash kernel as it is, or is read back to the host
    for the other paths (which a graph capture cannot do: models/graphs.py captures only where flash runs).
    With attn_bias, one SDPA call per sequence on any device (models with a bias are never captured). causal: the
    flash kernel's causal mask where it runs, else one SDPA call per sequence (nested tensors are not asked); window
    the same, with the flash kernel's sliding window or a band mask (both: causal within the window)."""
    global _nested_failed, _flash_failed
    if q.dim() != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one [tokens, heads, head_dim] shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if out is not None and (out.shape != (q.shape[0], q.shape[1] * q.shape[2]) or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous [tokens, heads*head_dim] tensor; got {tuple(out.shape)}")
    if window is not None and (attn_bias is not None or window < 0):
        raise ValueError(f"a window ({window=}) must be >= 0, and is taken without an additive bias")
    if attn_bias is not None:
        if causal:
            raise ValueError("attention takes an additive bias or a causal mask, not both")
        return _biased(q, k, v, cu_seqlens, out, attn_bias)
    if isinstance(cu_seqlens, DeviceLayout):
        if cu_seqlens.cu.dtype != torch.int32 or cu_seqlens.cu.dim() != 1 or cu_seqlens.cu.device != q.device:
            raise ValueError(f"a DeviceLayout's cu must be int32 [B + 1] on {q.device}")
        if not _flash_failed and flash_eligible(q) and flash_agrees(q.device, q.dtype, q.shape[-1], causal, window):
            return _flash(q, k, v, cu_seqlens.cu, cu_seqlens.max_seqlen, out, causal, window)
        cu_seqlens = cu_seqlens.cu.tolist()  # empty slots included: only the per-sequence path takes them
        return varlen_attention_reference(q, k, v, cu_seqlens, out, causal=causal, window=window)
    if not cu_seqlens or cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to {q.shape[0]}; got {cu_seqlens[:3]}...{cu_seqlens[-1:]}")
    if not _flash_failed and flash_eligible(q):
        try:
            if flash_agrees(q.device, q.dtype, q.shape[-1], causal, window):
                return varlen_attention_flash(q, k, v, cu_seqlens, out, causal, window)
        except (RuntimeError, NotImplementedError) as exc:  # a torch without the op, an unsupported device, ...
            _flash_failed = True
            log.warning("FlashAttention varlen unavailable (%s); using nested-tensor attention", exc)
    if (q.is_cuda or cuda.use_kernels(q)) and not _nested_failed and not causal and window is None:  # the emulator too
        try:
            return varlen_attention_nested(q, k, v, cu_seqlens, out)
        except (RuntimeError, NotImplementedError) as exc:  # older torch, unsupported head size, ...
            _nested_failed = True
            log.warning("nested-tensor attention unavailable (%s); using one SDPA call per sequence", exc)
    if q.device.type == "cpu" and window is None:  # short sequences share padded calls (kernels/attention_groups.py)
        return varlen_attention_grouped(q, k, v, cu_seqlens, out, causal)
    return varlen_attention_reference(q, k, v, cu_seqlens, out, causal=causal, window=window)


def _biased(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int] | DeviceLayout,
            out: torch.Tensor | None, attn_bias: torch.Tensor) -> torch.Tensor:
    """varlen_attention with an additive bias: its checks, then one SDPA call per sequence."""
    if isinstance(cu_seqlens, DeviceLayout):  # eager only: the host read cannot be captured in a graph
        cu_seqlens = cu_seqlens.cu.tolist()
    if not cu_seqlens or cu_seqlens[0] != 0 or cu_seqlens[-1] != q.shape[0]:
        raise ValueError(f"cu_seqlens must run from 0 to {q.shape[0]}; got {cu_seqlens[:3]}...{cu_seqlens[-1:]}")
    longest = max(end - start for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    heads = q.shape[1]
    if (attn_bias.dim() != 3 or attn_bias.shape[0] != heads or attn_bias.shape[1] < longest
            or attn_bias.shape[1] != attn_bias.shape[2]):
        raise ValueError(f"attn_bias must be [{heads}, L, L] with L >= the longest sequence ({longest}); "
                         f"got {tuple(attn_bias.shape)}")
    if attn_bias.dtype != q.dtype or attn_bias.device != q.device:
        raise ValueError(f"attn_bias must be {q.dtype} on {q.device}; got {attn_bias.dtype} on {attn_bias.device}")
    return varlen_attention_reference(q, k, v, cu_seqlens, out, attn_bias)
