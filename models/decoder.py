"""A decoder-only embedder (Qwen2, Qwen3, Mistral, Llama: Qwen3-Embedding, gte-Qwen2, e5-mistral-7b-instruct,
SFR-Embedding-Mistral, Linq-Embed-Mistral) that runs packed, as models/encoder.py's encoder does: every op but
attention sees [total_tokens, hidden], attention runs on each sequence's own tokens.

A layer is pre-norm: x + attn(rmsnorm(x)), then x + ffn(rmsnorm(x)), with a final RMSNorm after the last layer.
Attention is grouped-query (each key/value head serves num_heads // num_kv_heads query heads) over rotary positions
(each sequence numbered from 0; frequencies scaled, linearly or as Llama 3's, where config.json asks), causal unless
the config says otherwise (Mistral's: within its sliding window, a token seeing itself and the `window` tokens before
it); the feed-forward block is gated, down(silu(gate(x)) * up(x)). GEMMs are torch's on every device; on the kernel
path (CUDA, or the CPU under the emulator) every RMSNorm is kernels/rmsnorm.py's, the one before the feed-forward
block fused with the residual add that precedes it, while the CPU path keeps torch's F.rms_norm."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels.arena import FreshWorkspace, Workspace
from kernels.attention import DeviceLayout, varlen_attention
from kernels.cuda import use_kernels
from kernels.rmsnorm import residual_rmsnorm
from models.arch_config import RotaryScaling
from models.config import EncoderConfig
from models.encoder import PackedBatch, _activation_


class DecoderLayer(nn.Module):
    """Grouped-query self-attention and a gated feed-forward block, each after an RMSNorm, each added to x."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        parts, h = cfg.decoder, cfg.hidden_size
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, parts.num_kv_heads, parts.head_dim
        self.eps, self.act, self.causal, self.window = cfg.layer_norm_eps, cfg.activation, parts.causal, parts.window
        self.attn_norm = nn.RMSNorm(h, eps=self.eps)
        self.qkv = nn.Linear(h, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=parts.qkv_bias)  # one GEMM
        self.q_norm = nn.RMSNorm(self.head_dim, eps=self.eps) if parts.qk_norm else None  # Qwen3: per head
        self.k_norm = nn.RMSNorm(self.head_dim, eps=self.eps) if parts.qk_norm else None
        self.attn_out = nn.Linear(self.heads * self.head_dim, h, bias=parts.out_bias)
        self.ffn_norm = nn.RMSNorm(h, eps=self.eps)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=parts.mlp_bias)  # gate and up fused into one GEMM
        self.down = nn.Linear(cfg.intermediate_size, h, bias=parts.mlp_bias)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | DeviceLayout, ws: Workspace,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, H] -> [T, H]. rotary: each token's (cos, sin) [T, 1, head_dim / 2] (`rotary_tables`)."""
        tokens, hidden = x.shape
        new = partial(ws.empty, dtype=x.dtype, device=x.device)
        d, q_width = self.head_dim, self.heads * self.head_dim
        fused = x.is_cuda or use_kernels(x)  # CUDA, or the CPU under the emulator (kernels/emulate.py)
        norm = partial(_fused_rms_norm, new=new) if fused else _rms_norm
        qkv = _linear(norm(x, self.attn_norm), self.qkv, new)
        q, k, v = qkv_heads(qkv, self.heads, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = norm(q, self.q_norm), norm(k, self.k_norm)
        q = apply_rotary(q, *rotary, new((tokens, self.heads, d)))
        k = all_heads(apply_rotary(k, *rotary, new((tokens, self.kv_heads, d))), self.heads, new)
        ctx = varlen_attention(q, k, all_heads(v, self.heads, new), cu_seqlens, out=new((tokens, q_width)),
                               causal=self.causal, window=self.window)
        if fused:  # one kernel: x + attention's output (the next residual) and its norm, both into the workspace
            total, normed = new((tokens, hidden)), new((tokens, hidden))
            residual_rmsnorm(_linear(ctx, self.attn_out, new), x, self.ffn_norm.weight, self.eps, out=normed, sum_out=total)
            x = total
        else:
            x = _linear(ctx, self.attn_out, new).add_(x)
            normed = _rms_norm(x, self.ffn_norm)
        return _linear(gated_(_linear(normed, self.gate_up, new), self.act), self.down, new).add_(x)


def all_heads(t: torch.Tensor, heads: int, new) -> torch.Tensor:
    """Key or value heads [T, kv_heads, d] repeated for the query heads each serves, [T, heads, d]; as they are when
    every query head has its own."""
    tokens, kv, d = t.shape
    if kv == heads:
        return t
    out = new((tokens, heads, d))
    out.view(tokens, kv, heads // kv, d).copy_(t[:, :, None, :].expand(tokens, kv, heads // kv, d))
    return out


def qkv_heads(qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """The query, key and value heads of a fused projection [T, (heads + 2 * kv_heads) * head_dim] laid out
    [q | k | v]: views [T, heads, d], [T, kv_heads, d], [T, kv_heads, d] (the kernels read them in place)."""
    tokens, q_width, kv_width = qkv.shape[0], heads * head_dim, kv_heads * head_dim
    return (qkv[:, :q_width].view(tokens, heads, head_dim),
            qkv[:, q_width:q_width + kv_width].view(tokens, kv_heads, head_dim),
            qkv[:, q_width + kv_width:].view(tokens, kv_heads, head_dim))


def gated_(inner: torch.Tensor, activation: str, activated_first: bool = True) -> torch.Tensor:
    """A gated feed-forward block's product act(a) * b of the halves of inner [T, 2I] (a the first half where
    `activated_first`, else the second), in place in inner's activated half: a [T, I] view."""
    first, second = inner.chunk(2, dim=1)  # [T, I] views
    activated, other = (first, second) if activated_first else (second, first)
    _activation_(activated, activation)
    return activated.mul_(other)


def _rms_norm(x: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:
    """The CPU path's RMSNorm over the last dim: torch's, a new tensor."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


def _fused_rms_norm(x: torch.Tensor, norm: nn.RMSNorm, new) -> torch.Tensor:
    """The kernel path's: kernels/rmsnorm.py's into a new contiguous workspace tensor (x may be a [T, heads, d] view)."""
    return residual_rmsnorm(x, None, norm.weight, norm.eps, out=new(tuple(x.shape)))


def _linear(x: torch.Tensor, layer: nn.Linear, new) -> torch.Tensor:
    """layer(x) into a new workspace tensor."""
    out = new((x.shape[0], layer.out_features))
    if layer.bias is None:
        return torch.mm(x, layer.weight.t(), out=out)
    return torch.addmm(layer.bias, x, layer.weight.t(), out=out)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype,
                  scaling: RotaryScaling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [T, 1, head_dim / 2] of each token's position, made in float32 and cast to `dtype` as transformers
    makes them (its tables repeat these for the second half of the head); the frequencies scaled as `scaling` says
    (scaled_frequencies; None: plain)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    angles = positions.float()[:, None] * scaled_frequencies(1.0 / theta ** exponents, scaling)[None, :]
    return angles.cos().to(dtype)[:, None, :], angles.sin().to(dtype)[:, None, :]


def scaled_frequencies(inv_freq: torch.Tensor, scaling: RotaryScaling | None) -> torch.Tensor:
    """Rotary inverse frequencies inv_freq [head_dim / 2] (float32) under transformers' linear or Llama 3 scaling
    (None: as they are), op for op as transformers' _compute_linear_scaling_rope_parameters and
    _compute_llama3_parameters compute them."""
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    # llama3: long wavelengths (over original / low_freq_factor) divided by factor, short ones (under original /
    # high_freq_factor) kept, the medium ones blended from one to the other as the wavelength grows
    old, factor, low, high = scaling.original_positions, scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    llama = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * llama / factor + smooth * llama
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, llama)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Rotate each head's halves (x1, x2) by the token's angles into `out` [T, heads, d]: (x1 cos - x2 sin,
    x2 cos + x1 sin), transformers' `q * cos + rotate_half(q) * sin`."""
    half = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :half], x[..., half:], out[..., :half], out[..., half:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class RotaryModel(nn.Module):
    """What the packed rotary models (PackedDecoder, models/gemma.py's, models/modernbert.py's) share: their token
    embeddings `embed` looked up into the workspace, rotary tables for each kind of layer, and record_forward."""

    def embedded(self, batch: PackedBatch, ws: Workspace) -> torch.Tensor:
        """The batch's token embeddings [T, H], in a workspace tensor."""
        weight = self.embed.weight
        out = ws.empty((batch.input_ids.shape[0], weight.shape[1]), dtype=weight.dtype, device=weight.device)
        return torch.index_select(weight, 0, batch.input_ids, out=out)

    def rotary_by_kind(self, batch: PackedBatch, head_dim: int, local_layers: tuple[bool, ...], full_theta: float,
                       local_theta: float) -> dict[bool, tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) of each kind of layer the model has (False: full, True: local, each its rotary base), once a batch."""
        return {local: rotary_tables(batch.position_ids, head_dim, local_theta if local else full_theta,
                                     self.embed.weight.dtype) for local in sorted(set(local_layers))}

    def record_forward(self, ws: Workspace, tokens: int) -> torch.Tensor:
        """One forward over a single sequence of `tokens` tokens, for recording lifetimes (kernels.arena)."""
        batch = PackedBatch.from_ids([[0] * tokens], 0, self.embed.weight.device)
        return self(batch, ws)


class PackedDecoder(RotaryModel):
    """Token embeddings + N decoder layers + the final RMSNorm; returns the last hidden states of all packed tokens.
    The same interface as models/encoder.py's PackedEncoder (forward, record_forward, cfg)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.decoder is None:
            raise ValueError(f"{cfg.model_type} is not a decoder-only model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch, ws: Workspace | None = None) -> torch.Tensor:
        """Last hidden states [T, H]; intermediates from `ws` (a fresh torch allocation each when None)."""
        ws = ws or FreshWorkspace()
        x = self.embedded(batch, ws)
        parts = self.cfg.decoder
        rotary = rotary_tables(batch.position_ids, parts.head_dim, parts.rope_theta, x.dtype, scaling=parts.rope_scaling)
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, ws, rotary)
        if x.is_cuda or use_kernels(x):
            return _fused_rms_norm(x, self.norm, partial(ws.empty, dtype=x.dtype, device=x.device))
        return _rms_norm(x, self.norm)
