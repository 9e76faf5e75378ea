"""ModernBERT (gte-modernbert-base, modernbert-embed-base, ...) run packed, as models/encoder.py's encoder is: every op
but attention sees [total_tokens, hidden], attention runs on each sequence's own tokens.

The embeddings are the token embeddings through a LayerNorm (no position embeddings: positions are rotary, each
sequence numbered from 0). A layer is pre-norm: x + attn(norm(x)) (layer 0 takes x as it is: the embeddings' norm
just ran), then x + mlp(norm(x)), with a final LayerNorm after the last layer. Attention is bidirectional over fused
Wqkv heads; global layers see the whole sequence, local ones the tokens at most local_attention // 2 places away, each
kind with its own rotary base. The feed-forward block is GeGLU: Wo(act(input) * gate) where Wi(x) = [input, gate].
GEMMs and norms are torch's on every device (no CuPy kernel of this file's own)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from kernels.arena import FreshWorkspace, Workspace
from kernels.attention import DeviceLayout, varlen_attention
from models.config import EncoderConfig
from models.decoder import RotaryModel, _linear, apply_rotary, gated_, qkv_heads
from models.encoder import PackedBatch, _activation_


class ModernBertLayer(nn.Module):
    """Self-attention (windowed in a local layer) and a GeGLU feed-forward block, each after a LayerNorm, each added
    to x."""

    def __init__(self, cfg: EncoderConfig, index: int):
        super().__init__()
        parts, h = cfg.modernbert, cfg.hidden_size
        self.heads, self.head_dim, self.eps = cfg.num_heads, h // cfg.num_heads, cfg.layer_norm_eps
        self.act = cfg.activation
        self.local = parts.local_layers[index]
        self.window = parts.window if self.local else None
        # layer 0's attention norm is transformers' Identity: no parameters, nothing run
        self.attn_norm = nn.LayerNorm(h, eps=self.eps, bias=parts.norm_bias) if index else None
        self.qkv = nn.Linear(h, 3 * h, bias=parts.attention_bias)  # Wqkv: [q | k | v], heads inside each
        self.attn_out = nn.Linear(h, h, bias=parts.attention_bias)
        self.ffn_norm = nn.LayerNorm(h, eps=self.eps, bias=parts.norm_bias)
        self.ffn_in = nn.Linear(h, 2 * cfg.intermediate_size, bias=parts.mlp_bias)  # Wi: [input | gate]
        self.ffn_out = nn.Linear(cfg.intermediate_size, h, bias=parts.mlp_bias)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | DeviceLayout, ws: Workspace,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, H] -> [T, H]. rotary: each token's (cos, sin) [T, 1, head_dim / 2] for this layer's kind."""
        tokens, hidden = x.shape
        new = partial(ws.empty, dtype=x.dtype, device=x.device)
        d = self.head_dim
        normed = x if self.attn_norm is None else _norm(x, self.attn_norm)
        qkv = _linear(normed, self.qkv, new)  # [T, 3H]
        q, k, v = qkv_heads(qkv, self.heads, self.heads, d)
        q = apply_rotary(q, *rotary, new((tokens, self.heads, d)))
        k = apply_rotary(k, *rotary, new((tokens, self.heads, d)))
        ctx = varlen_attention(q, k, v, cu_seqlens, out=new((tokens, hidden)), window=self.window)
        x = _linear(ctx, self.attn_out, new).add_(x)
        inner = gated_(_linear(_norm(x, self.ffn_norm), self.ffn_in, new), self.act)  # Wi: [input | gate]
        return _linear(inner, self.ffn_out, new).add_(x)


def _norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    """LayerNorm of x [T, H], with or without its bias (ModernBERT's norm_bias)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class ModernBertClassificationHead(nn.Module):
    """ModernBertForSequenceClassification's head over each sequence's pooled state (its first token's, or the mean of
    its tokens'): dense, the classifier activation, LayerNorm, then one logit a label (`out`)."""

    def __init__(self, cfg: EncoderConfig, labels: int):
        super().__init__()
        parts, h = cfg.modernbert, cfg.hidden_size
        self.act = parts.classifier_activation
        self.dense = nn.Linear(h, h, bias=parts.classifier_bias)
        self.norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps, bias=parts.norm_bias)
        self.out = nn.Linear(h, labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [B, H] -> logits [B, labels]."""
        h = self.dense(pooled)
        _activation_(h, self.act)
        return self.out(self.norm(h))


class PackedModernBert(RotaryModel):
    """Token embeddings + their LayerNorm + N layers + the final LayerNorm; returns the last hidden states of all packed
    tokens. The same interface as models/encoder.py's PackedEncoder (forward, record_forward, cfg)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.modernbert is None:
            raise ValueError(f"{cfg.model_type} is not a ModernBERT model")
        parts = cfg.modernbert
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=parts.norm_bias)
        self.layers = nn.ModuleList(ModernBertLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, bias=parts.norm_bias)

    def forward(self, batch: PackedBatch, ws: Workspace | None = None) -> torch.Tensor:
        """Last hidden states [T, H]; intermediates from `ws` (a fresh torch allocation each when None)."""
        ws = ws or FreshWorkspace()
        parts = self.cfg.modernbert
        x = _norm(self.embedded(batch, ws), self.embed_norm)
        rotary = self.rotary_by_kind(batch, self.cfg.hidden_size // self.cfg.num_heads, parts.local_layers,
                                     parts.global_rope_theta, parts.local_rope_theta)
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, ws, rotary[layer.local])
        return _norm(x, self.final_norm)
