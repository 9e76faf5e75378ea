"""Gemma3's text model (EmbeddingGemma) run packed, as models/decoder.py's decoder is: every op but attention sees
[total_tokens, hidden], attention runs on each sequence's own tokens.

What differs from Qwen's layer: the token embeddings are scaled by sqrt(hidden) (rounded to the weights' dtype, as
transformers does); every RMSNorm scales by (1 + weight), computed in float32 and cast back (transformers'
Gemma3RMSNorm), so these stay torch ops on every device rather than kernels/rmsnorm.py's kernel, which multiplies by
the weight in its own rounding order; each sub-block is sandwiched between two norms, x + post(block(pre(x))); the
query and key heads are normed; attention is bidirectional (EmbeddingGemma's use_bidirectional_attention), over the
whole sequence in full layers and within a window in sliding ones, each kind with its own rotary base, its scores
scaled by query_pre_attn_scalar ** -0.5; the feed-forward block is gated, down(gelu_tanh(gate(x)) * up(x))."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels.arena import FreshWorkspace, Workspace
from kernels.attention import DeviceLayout, varlen_attention
from models.config import EncoderConfig
from models.decoder import RotaryModel, _linear, all_heads, apply_rotary, gated_, qkv_heads
from models.encoder import PackedBatch


class GemmaRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight) over the last dim, in float32 whatever x's dtype, cast back to it at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] (a strided view is fine) -> a new [..., dim] tensor of x's dtype."""
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps).to(x.dtype)


class GemmaLayer(nn.Module):
    """Grouped-query bidirectional self-attention (windowed in a local layer) and a gated feed-forward block, each
    between two RMSNorms, each added to x."""

    def __init__(self, cfg: EncoderConfig, local: bool):
        super().__init__()
        parts, h, eps = cfg.decoder, cfg.hidden_size, cfg.layer_norm_eps
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, parts.num_kv_heads, parts.head_dim
        self.local, self.act = local, cfg.activation
        self.window = parts.window if local else None
        # transformers scales the scores by query_pre_attn_scalar ** -0.5, the attention paths by head_dim ** -0.5:
        # the queries take the ratio (EmbeddingGemma's two are both 256: no work)
        self.q_scale = (parts.head_dim / parts.query_pre_attn_scalar) ** 0.5
        self.attn_norm, self.post_attn_norm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.qkv = nn.Linear(h, (self.heads + 2 * self.kv_heads) * self.head_dim, bias=parts.qkv_bias)  # one GEMM
        self.q_norm, self.k_norm = GemmaRMSNorm(self.head_dim, eps), GemmaRMSNorm(self.head_dim, eps)
        self.attn_out = nn.Linear(self.heads * self.head_dim, h, bias=parts.out_bias)
        self.ffn_norm, self.post_ffn_norm = GemmaRMSNorm(h, eps), GemmaRMSNorm(h, eps)
        self.gate_up = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)  # gate and up fused into one GEMM
        self.down = nn.Linear(cfg.intermediate_size, h, bias=False)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | DeviceLayout, ws: Workspace,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, H] -> [T, H]. rotary: each token's (cos, sin) [T, 1, head_dim / 2] for this layer's kind."""
        tokens = x.shape[0]
        new = partial(ws.empty, dtype=x.dtype, device=x.device)
        d, q_width = self.head_dim, self.heads * self.head_dim
        q, k, v = qkv_heads(_linear(self.attn_norm(x), self.qkv, new), self.heads, self.kv_heads, d)
        q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rotary(q, *rotary, new((tokens, self.heads, d)))
        if self.q_scale != 1.0:
            q.mul_(self.q_scale)
        k = all_heads(apply_rotary(k, *rotary, new((tokens, self.kv_heads, d))), self.heads, new)
        ctx = varlen_attention(q, k, all_heads(v, self.heads, new), cu_seqlens, out=new((tokens, q_width)),
                               window=self.window)
        x = self.post_attn_norm(_linear(ctx, self.attn_out, new)).add_(x)
        inner = gated_(_linear(self.ffn_norm(x), self.gate_up, new), self.act)
        return self.post_ffn_norm(_linear(inner, self.down, new)).add_(x)


class PackedGemma(RotaryModel):
    """Scaled token embeddings + N Gemma layers + the final RMSNorm; returns the last hidden states of all packed
    tokens. The same interface as models/decoder.py's PackedDecoder (forward, record_forward, cfg)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.decoder is None or len(cfg.decoder.local_layers) != cfg.num_layers:
            raise ValueError(f"{cfg.model_type} is not a Gemma3 config (one local_layers flag a layer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(GemmaLayer(cfg, local) for local in cfg.decoder.local_layers)
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, batch: PackedBatch, ws: Workspace | None = None) -> torch.Tensor:
        """Last hidden states [T, H]; intermediates from `ws` (a fresh torch allocation each when None)."""
        ws = ws or FreshWorkspace()
        parts = self.cfg.decoder
        x = self.embedded(batch, ws)
        x.mul_(_embed_scale(self.cfg.hidden_size, x.dtype))
        rotary = self.rotary_by_kind(batch, parts.head_dim, parts.local_layers, parts.rope_theta, parts.local_rope_theta)
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, ws, rotary[layer.local])
        return self.norm(x)


def _embed_scale(hidden: int, dtype: torch.dtype) -> float:
    """sqrt(hidden) in float32 rounded to `dtype`, as transformers' Gemma3TextScaledWordEmbedding multiplies by it
    (55.5, not 55.43, for a hidden size of 3072 in bfloat16). Out of sight of torch-function modes: a mode recording
    the forward's op sequence (kernels/arena.py) sees only the multiply."""
    with torch._C.DisableTorchFunction():
        return torch.tensor(hidden ** 0.5, dtype=torch.float32).to(dtype).item()
