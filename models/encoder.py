"""A BERT-family encoder that runs packed: every op but attention sees [total_tokens, hidden]."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from kernels.activation import activate_, bias_activation, check_activation
from kernels.arena import FreshWorkspace, Workspace
from kernels.attention import DeviceLayout, varlen_attention
from kernels.cuda import use_kernels
from kernels.layernorm import bias_residual_layernorm
from kernels.qkv import split_qkv
from models.config import EncoderConfig
from models.relative_bias import RelativePositionBias, longest_sequence


@dataclass
class PackedBatch:
    """A batch of sequences laid end to end, with the offsets that separate them."""

    input_ids: torch.Tensor  # [T] int64
    position_ids: torch.Tensor  # [T] int64
    cu_seqlens: list[int] | DeviceLayout  # [B + 1], token offsets of each sequence (on the device in a CUDA graph)
    seq_index: torch.Tensor  # [T] int64, which sequence each token belongs to
    token_type_ids: torch.Tensor | None = None  # [T] int64 for text pairs; None: every token is of type 0

    @property
    def num_seqs(self) -> int:
        return len(self.cu_seqlens) - 1

    @classmethod
    def from_ids(cls, sequences: list[list[int]], position_offset: int, device: torch.device | str = "cpu",
                 segments: list[int | None] | None = None) -> "PackedBatch":
        """segments: for text pairs, where each sequence's second text starts (its tokens are of type 1, as the
        tokenizer's pair template makes them); None for a single text."""
        lengths = [len(s) for s in sequences]
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        flat = [tok for seq in sequences for tok in seq]
        if position_offset and (position_offset - 1) in flat:  # a RoBERTa padding id inside an input
            starts = np.asarray(cu, dtype=np.int64)
            positions = padded_positions(np.asarray(flat, dtype=np.int64), starts, np.diff(starts), position_offset)
        else:
            positions = [position_offset + i for n in lengths for i in range(n)]
        seq_index = [b for b, n in enumerate(lengths) for _ in range(n)]
        as_long = dict(dtype=torch.long, device=device)
        types = None
        if segments is not None and any(s is not None for s in segments):
            starts = [n if s is None else s for s, n in zip(segments, lengths)]
            types = torch.tensor([int(i >= s) for s, n in zip(starts, lengths) for i in range(n)], **as_long)
        return cls(torch.tensor(flat, **as_long), torch.tensor(positions, **as_long), cu, torch.tensor(seq_index, **as_long),
                   types)


def padded_positions(ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray, position_offset: int) -> np.ndarray:
    """RoBERTa's position ids (transformers' create_position_ids_from_input_ids): a token equal to the padding id
    (position_offset - 1) takes the padding's position, and the tokens after it do not count it. ids: the packed
    tokens; starts: each sequence's first index (and the total); lengths: each sequence's length."""
    pad = position_offset - 1
    keep = (ids != pad).astype(np.int64)
    counted = np.cumsum(keep)
    before = np.concatenate(([0], counted))[starts[:-1]]  # tokens counted before each sequence
    return np.where(keep == 1, counted - np.repeat(before, lengths) + pad, pad)


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

    def forward(self, x: torch.Tensor, cu_seqlens: list[int] | DeviceLayout, ws: Workspace,
                attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, H] -> [T, H]; every intermediate comes from `ws` and is written in place or with out=. attn_bias: an
        additive attention bias [heads, Lmax, Lmax] (MPNet's relative positions), each sequence its top-left block."""
        tokens, hidden = x.shape
        new = partial(ws.empty, dtype=x.dtype, device=x.device)
        if x.is_cuda or use_kernels(x):  # CUDA, or the CPU under the emulator (kernels/emulate.py)
            # GEMMs without bias; the fused kernel that follows each adds it.
            qkv = torch.mm(x, self.qkv.weight.t(), out=new((tokens, 3 * hidden)))
            q, k, v = split_qkv(qkv, self.qkv.bias, self.num_heads, out=new((3, tokens, hidden)))
            ctx = varlen_attention(q, k, v, cu_seqlens, out=new((tokens, hidden)), attn_bias=attn_bias)
            proj = torch.mm(ctx, self.attn_out.weight.t(), out=new((tokens, hidden)))
            x = bias_residual_layernorm(proj, self.attn_out.bias, x, self.attn_norm.weight, self.attn_norm.bias, self.eps,
                                        out=new((tokens, hidden)))
            inner = torch.mm(x, self.ffn_in.weight.t(), out=new((tokens, self.ffn_in.out_features)))
            bias_activation(inner, self.ffn_in.bias, self.act, out=inner)
            proj = torch.mm(inner, self.ffn_out.weight.t(), out=new((tokens, hidden)))
            return bias_residual_layernorm(proj, self.ffn_out.bias, x, self.ffn_norm.weight, self.ffn_norm.bias, self.eps,
                                           out=new((tokens, hidden)))
        # CPU: the bias rides in the GEMM (addmm), the residual is added in place, LayerNorm writes out=.
        qkv = torch.addmm(self.qkv.bias, x, self.qkv.weight.t(), out=new((tokens, 3 * hidden)))
        q, k, v = split_qkv(qkv, None, self.num_heads)  # views of qkv
        ctx = varlen_attention(q, k, v, cu_seqlens, out=new((tokens, hidden)), attn_bias=attn_bias)
        proj = torch.addmm(self.attn_out.bias, ctx, self.attn_out.weight.t(), out=new((tokens, hidden)))
        x = _layer_norm(proj.add_(x), self.attn_norm, ws)
        inner = torch.addmm(self.ffn_in.bias, x, self.ffn_in.weight.t(), out=new((tokens, self.ffn_in.out_features)))
        _activation_(inner, self.act)
        proj = torch.addmm(self.ffn_out.bias, inner, self.ffn_out.weight.t(), out=new((tokens, hidden)))
        return _layer_norm(proj.add_(x), self.ffn_norm, ws)


def _layer_norm(y: torch.Tensor, norm: nn.LayerNorm, ws: Workspace) -> torch.Tensor:
    """LayerNorm of y [T, H] into a new workspace tensor; the row statistics go to the workspace too."""
    tokens, hidden = y.shape
    out = ws.empty((tokens, hidden), dtype=y.dtype, device=y.device)
    stats = ws.empty((2, tokens, 1), dtype=y.dtype, device=y.device)  # mean, rstd (accumulated in fp32 whatever the dtype)
    torch.ops.aten.native_layer_norm.out(y, [hidden], norm.weight, norm.bias, norm.eps, out0=out, out1=stats[0], out2=stats[1])
    return out


def _activation_(x: torch.Tensor, kind: str) -> None:
    """The model's activation, in place, by any name kernels/activation.py knows (gelu_pytorch_tanh and gelu_fast are
    the tanh GELU, as on CUDA: this path once ran SiLU for them)."""
    activate_(x, kind)


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
        # MPNet: one table of relative position biases for every layer; None for the others (no work per batch)
        self.relative_attention_bias = (RelativePositionBias(cfg.relative_attention_buckets, cfg.num_heads)
                                        if cfg.relative_attention_buckets else None)

    def forward(self, batch: PackedBatch, ws: Workspace | None = None) -> torch.Tensor:
        """Last hidden states [T, H]; intermediates from `ws` (a fresh torch allocation each when None)."""
        ws = ws or FreshWorkspace()
        tokens, hidden = batch.input_ids.shape[0], self.cfg.hidden_size
        weight = self.word_embeddings.weight
        new = partial(ws.empty, dtype=weight.dtype, device=weight.device)
        # Single texts are all of token type 0; text pairs (cross-encoders) carry their types.
        x = torch.index_select(weight, 0, batch.input_ids, out=new((tokens, hidden)))
        pos = torch.index_select(self.position_embeddings.weight, 0, batch.position_ids, out=new((tokens, hidden)))
        if batch.token_type_ids is not None:  # text pairs: each token's own type
            pos.add_(torch.index_select(self.token_type_embeddings.weight, 0, batch.token_type_ids))
        else:
            pos.add_(self.token_type_embeddings.weight[0])
        if weight.is_cuda or use_kernels(weight):
            x = bias_residual_layernorm(x, None, pos, self.embed_norm.weight, self.embed_norm.bias, self.embed_norm.eps,
                                        out=new((tokens, hidden)))
        else:
            x = _layer_norm(x.add_(pos), self.embed_norm, ws)  # [T, H]
        attn_bias = None  # [heads, Lmax, Lmax], made once a batch for every layer
        if self.relative_attention_bias is not None:
            attn_bias = self.relative_attention_bias(longest_sequence(batch.cu_seqlens))
        for layer in self.layers:
            x = layer(x, batch.cu_seqlens, ws, attn_bias)
        return x

    def record_forward(self, ws: Workspace, tokens: int) -> torch.Tensor:
        """One forward over a single sequence of `tokens` tokens, for recording lifetimes (kernels.arena)."""
        device = self.word_embeddings.weight.device
        batch = PackedBatch.from_ids([[0] * tokens], self.cfg.position_offset, device)
        return self(batch, ws)


class ClassificationHead(nn.Module):
    """A sequence classifier's head over the first token's hidden state: dense + tanh, then one logit a label
    (BERT's pooler + classifier, RoBERTa's classifier.dense + out_proj: the same computation)."""

    def __init__(self, hidden: int, labels: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, labels)

    def forward(self, first: torch.Tensor) -> torch.Tensor:
        """first: [B, H], each sequence's first token -> logits [B, labels]."""
        return self.out(torch.tanh(self.dense(first)))


class ScoreHead(nn.Module):
    """A decoder's sequence classifier (Qwen2/Qwen3/Mistral/Llama *ForSequenceClassification, transformers'
    GenericForSequenceClassification): `score`, one Linear without bias, over the token transformers reads. transformers
    pads the batch and takes each row's rightmost token whose id is not pad_token_id (the first token when every one
    is), so a text that itself ends with the pad token (Qwen's <|endoftext|>, which Qwen3's template appends) is read
    at the token before: `last_tokens` applies that rule to the packed sequences, which hold no padding."""

    def __init__(self, hidden: int, labels: int, pad_token_id: int | None):
        super().__init__()
        self.out = nn.Linear(hidden, labels, bias=False)
        self.pad_token_id = pad_token_id

    def last_tokens(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """hidden: [T, H] packed -> [B, H], each sequence's last token that is not the pad token (else its first)."""
        cu = torch.as_tensor(batch.cu_seqlens, device=hidden.device)  # [B + 1]
        if self.pad_token_id is None:  # transformers: the last token (it refuses batches of more than one)
            return hidden[cu[1:] - 1]
        starts = cu[:-1][batch.seq_index]  # [T], each token's sequence's first index
        index = torch.arange(hidden.shape[0], device=hidden.device)
        candidates = torch.where(batch.input_ids != self.pad_token_id, index, starts)  # a pad token: its first
        rows = cu[:-1].clone().scatter_reduce_(0, batch.seq_index, candidates, "amax")  # [B]
        return hidden[rows]

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: [B, H] (`last_tokens`) -> logits [B, labels]."""
        return self.out(pooled)


class SpladeHead(nn.Module):
    """SPLADE pooling over a masked-LM head: for each sequence, the max over its tokens of log(1 + relu(logit))
    for every vocabulary word (a sparse vector: most entries are 0). The [tokens, vocab] logits are made a chunk of
    tokens at a time (a 256-token text's would be 31 MB in fp32 for a 30k vocabulary, a batch's gigabytes)."""

    CHUNK_TOKENS = 512

    def __init__(self, hidden: int, vocab: int, activation: str, eps: float):
        super().__init__()
        self.activation = activation
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """hidden: [T, H] packed last hidden states -> [B, vocab] float32 SPLADE weights."""
        out = torch.zeros(batch.num_seqs, self.decoder.out_features, dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], self.CHUNK_TOKENS):
            h = self.dense(hidden[start:start + self.CHUNK_TOKENS])
            _activation_(h, self.activation)
            weights = torch.log1p(torch.relu_(self.decoder(self.norm(h))).float())  # [chunk, vocab]
            rows = batch.seq_index[start:start + self.CHUNK_TOKENS]
            out.scatter_reduce_(0, rows[:, None].expand_as(weights), weights, "amax")  # every weight is >= 0
        return out


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
    if mode == "splade":
        raise ValueError("splade pooling needs the model's masked-LM head (SpladeHead)")
    raise ValueError(f"unknown pooling mode {mode!r}")
