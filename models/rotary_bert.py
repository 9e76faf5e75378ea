"""NomicBERT (nomic-embed-text-v1, v1.5) and GTE (Alibaba's gte-base/large-en-v1.5, gte-multilingual-base and its
re-ranker) run packed, as models/encoder.py's encoder is: every op but attention sees [total_tokens, hidden], attention
runs on each sequence's own tokens.

Both are BERT's post-norm layers with two changes: positions are rotary (each sequence numbered from 0, as transformers'
rotate_half tables), not an embedding table; the feed-forward block is gated, down(act(gate(x)) * up(x)). The embeddings
are the token embeddings plus the token type's (where the model has types) through a LayerNorm. A layer is
x = LN(x + out(attn(x))), then x = LN(x + down(act(gate(x)) * up(x))). Which projections have biases is the config's
(models/rotary_bert_config.py RotaryBertParts). On the kernel path (CUDA, or the CPU under the emulator) each bias + residual +
LayerNorm is kernels/layernorm.py's fused kernel, as in the BERT encoder; GEMMs, rotary and the gate are torch's."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from kernels.arena import FreshWorkspace, Workspace
from kernels.attention import DeviceLayout, varlen_attention
from kernels.cuda import use_kernels
from kernels.layernorm import bias_residual_layernorm
from models.arch_config import RotaryScaling
from models.config import EncoderConfig
from models.decoder import RotaryModel, _linear, apply_rotary, gated_, qkv_heads, rotary_tables
from models.encoder import PackedBatch, _layer_norm


class RotaryBertLayer(nn.Module):
    """Self-attention over rotary positions and a gated feed-forward block, each added to x and LayerNormed after."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        parts, h = cfg.rotary, cfg.hidden_size
        self.heads, self.head_dim, self.act = cfg.num_heads, h // cfg.num_heads, cfg.activation
        self.qkv = nn.Linear(h, 3 * h, bias=parts.qkv_bias)  # [q | k | v], heads inside each
        self.attn_out = nn.Linear(h, h, bias=parts.out_bias)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.up_gate = nn.Linear(h, 2 * cfg.intermediate_size, bias=False)  # [up | gate], one GEMM
        self.down = nn.Linear(cfg.intermediate_size, h, bias=parts.down_bias)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | DeviceLayout, ws: Workspace,
                rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x: [T, H] -> [T, H]. rotary: each token's (cos, sin) [T, 1, head_dim / 2]."""
        tokens, hidden = x.shape
        new = partial(ws.empty, dtype=x.dtype, device=x.device)
        d = self.head_dim
        qkv = _linear(x, self.qkv, new)  # [T, 3H]
        q, k, v = qkv_heads(qkv, self.heads, self.heads, d)
        q = apply_rotary(q, *rotary, new((tokens, self.heads, d)))
        k = apply_rotary(k, *rotary, new((tokens, self.heads, d)))
        ctx = varlen_attention(q, k, v, cu_seqlens, out=new((tokens, hidden)))
        x = _add_norm(ctx, self.attn_out, x, self.attn_norm, ws)
        inner = gated_(_linear(x, self.up_gate, new), self.act, activated_first=False)  # [up | gate]
        return _add_norm(inner, self.down, x, self.ffn_norm, ws)


def _add_norm(y: torch.Tensor, layer: nn.Linear, x: torch.Tensor, norm: nn.LayerNorm, ws: Workspace) -> torch.Tensor:
    """LayerNorm(layer(y) + x) into a new workspace tensor: on the kernel path the GEMM without its bias and the fused
    bias + residual + LayerNorm kernel; on the CPU path the bias in the GEMM and torch's LayerNorm."""
    new = partial(ws.empty, dtype=x.dtype, device=x.device)
    if x.is_cuda or use_kernels(x):
        proj = torch.mm(y, layer.weight.t(), out=new((y.shape[0], layer.out_features)))
        return bias_residual_layernorm(proj, layer.bias, x, norm.weight, norm.bias, norm.eps, out=new(tuple(x.shape)))
    return _layer_norm(_linear(y, layer, new).add_(x), norm, ws)


class PackedRotaryBert(RotaryModel):
    """Token (+ token type) embeddings + their LayerNorm + N layers; returns the last hidden states of all packed tokens.
    The same interface as models/encoder.py's PackedEncoder (forward, record_forward, cfg)."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if cfg.rotary is None:
            raise ValueError(f"{cfg.model_type} is not a NomicBERT or GTE model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.token_types = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(RotaryBertLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: PackedBatch, ws: Workspace | None = None) -> torch.Tensor:
        """Last hidden states [T, H]; intermediates from `ws` (a fresh torch allocation each when None)."""
        ws = ws or FreshWorkspace()
        x = self.embedded(batch, ws)
        if self.token_types is not None:  # single texts are all of type 0; text pairs carry their types
            if batch.token_type_ids is None:
                x.add_(self.token_types.weight[0])
            else:
                x.add_(torch.index_select(self.token_types.weight, 0, batch.token_type_ids))
        x = _layer_norm(x, self.embed_norm, ws)
        parts = self.cfg.rotary
        rotary = rotary_tables(batch.position_ids, self.cfg.hidden_size // self.cfg.num_heads, parts.rope_theta, x.dtype,
                               RotaryScaling("linear", parts.rope_scale) if parts.rope_scale != 1.0 else None)
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, ws, rotary)
        return x
