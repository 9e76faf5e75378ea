"""A BERT-family encoder that runs packed: every op but attention sees [total_tokens, hidden]."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.activation import bias_activation, check_activation
from kernels.attention import varlen_attention
from kernels.layernorm import bias_residual_layernorm
from kernels.qkv import split_qkv
from models.config import EncoderConfig


@dataclass
class PackedBatch:
    """A batch of sequences laid end to end, with the offsets that separate them."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: list[int]  # [B + 1], token offsets of each sequence
    seq_index: torch.Tensor  # [T] int64, which sequence each token belongs to

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @classmethod
    def from_ids(cls, sequences: list[list[int]], position_offset: int, device: torch.device | str = "cpu") -> "PackedBatch":
        lengths = [len(s) for s in sequences]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        flat = [tok for seq in sequences for tok in seq]
        positions = [position_offset + i for n in lengths for i in range(n)]
        seq_index = [b for b, n in enumerate(lengths) for _ in range(n)]
        as_long = dict(dtype=torch.long, device=device)
        return cls(torch.tensor(flat, **as_long), torch.tensor(positions, **as_long), cu, torch.tensor(seq_index, **as_long))


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward blocks, post-LayerNorm as in BERT."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.eps = cfg.layer_norm_eps
        self.act = cfg.activation
        self.qkv = nn.Linear(h, 3 * h)  # Q, K and V fused into one GEMM
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
        # x: [T, H]. On CUDA the GEMMs leave their bias to the fused kernel that follows them; on CPU
        # the bias rides in the GEMM (addmm) and the ops get none.
        fused = x.is_cuda

        def gemm(layer: nn.Linear, inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            return (F.linear(inp, layer.weight), layer.bias) if fused else (F.linear(inp, layer.weight, layer.bias), None)

        q, k, v = split_qkv(*gemm(self.qkv, x), self.num_heads)  # each [T, heads, d]
        ctx = varlen_attention(q, k, v, cu_seqlens)  # [T, H]
        x = bias_residual_layernorm(*gemm(self.attn_out, ctx), x, self.attn_norm.weight, self.attn_norm.bias, self.eps)
        inner = bias_activation(*gemm(self.ffn_in, x), self.act)  # [T, I]
        return bias_residual_layernorm(*gemm(self.ffn_out, inner), x, self.ffn_norm.weight, self.ffn_norm.bias, self.eps)


class PackedEncoder(nn.Module):
    """Embeddings + N encoder layers; returns the last hidden states of all packed tokens."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        check_activation(cfg.activation)
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h)
        self.position_embeddings = nn.Embedding(cfg.max_positions, h)
        # DistilBERT has no token types; a zero row keeps one code path.
        self.token_type_embeddings = nn.Embedding(max(cfg.type_vocab_size, 1), h)
        self.embed_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        # All inputs are single-segment, so every token has token type 0.
        x = self.word_embeddings(batch.input_ids) + self.position_embeddings(batch.position_ids)
        x = self.embed_norm(x + self.token_type_embeddings.weight[0])  # [T, H]
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens)
        return x


def pool(hidden: torch.Tensor, batch: PackedBatch, mode: str) -> torch.Tensor:
    """Pool packed hidden states [T, H] to one vector per sequence [B, H]."""
    if mode == "mean":
        sums = torch.zeros(batch.num_seqs, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        sums.index_add_(0, batch.seq_index, hidden.float())
        lengths = torch.tensor([e - s for s, e in zip(batch.cu_seqlens[:-1], batch.cu_seqlens[1:])], device=hidden.device)
        return sums / lengths.unsqueeze(1)
    if mode == "cls":
        return hidden[batch.cu_seqlens[:-1]].float()
    if mode == "last":
        return hidden[[e - 1 for e in batch.cu_seqlens[1:]]].float()
    raise ValueError(f"unknown pooling mode {mode!r}")
