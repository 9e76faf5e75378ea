"""The embedding model as the server sees it: load, tokenize, run a packed batch, post-process (whether a folder and
settings can be served at all: models/checks.py)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from kernels import cuda
from kernels.arena import Arena, new_arena
from kernels.attention import flash_agrees, flash_eligible
from models.checks import check_model_settings
from models.config import default_model_path, tokenizer_gives_token_types, tokenizer_max_length
from models.encoder import ClassificationHead, PackedBatch, SpladeHead, pool
from models.folder import read_model_folder, token_classifier
from models.graphs import GraphedForward
from models.tokenizer import TextTokenizer
from models.weights import load_encoder, load_head, load_mlm_head, reader

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    """What the batching worker needs of a model: pooled vectors for a batch of token-id lists."""

    dim: int

    def embed(self, sequences: list[list[int]], per_token: list[bool] | None = None,
              segments: list[int | None] | None = None) -> np.ndarray | list[np.ndarray]:
        """Return float32 [len(sequences), dim], pooled and not normalised; with per_token, a list whose
        flagged entries are instead the last hidden state of every token, [length, dim]. segments: for text
        pairs, where each one's second text starts (token type 1; given only when some are pairs)."""
        ...


@dataclass(frozen=True)
class ModelInfo:
    """Facts the APIs report: name, sizes, limits, defaults."""

    name: str
    path: str
    model_type: str
    dim: int
    max_input_length: int
    pooling: str
    normalize: bool
    matryoshka_dimensions: tuple[int, ...]
    dtype: str
    device: str
    prompts: dict[str, str] = field(default_factory=dict)  # sentence-transformers' named prompts
    default_prompt_name: str | None = None  # the prompt put before every text input that names none
    labels: tuple[str, ...] = ()  # a classification head's labels (its outputs are their logits); () for embeddings

    @property
    def sparse(self) -> bool:
        """A SPLADE model: its vectors are vocabulary-sized and mostly zero (TEI's /embed_sparse)."""
        return self.pooling == "splade"

    @property
    def kind(self) -> str:
        """"embedding", "reranker" (a classifier with one label: a cross-encoder) or "classifier"."""
        return "embedding" if not self.labels else "reranker" if len(self.labels) == 1 else "classifier"


class EncoderEmbedder:
    """A PackedEncoder plus pooling on one device; `embed` runs in the worker thread.

    With an arena, every intermediate of a batch is a view into the arena's planned chunks; the pooled
    output is a fresh tensor, so nothing returned points into the arena.
    """

    def __init__(self, encoder, pooling: str, position_offset: int, device: torch.device, arena: Arena | None = None,
                 head: ClassificationHead | None = None, sparse: SpladeHead | None = None,
                 dense: list[tuple[np.ndarray, np.ndarray | None, str]] | None = None, token_types: bool = True):
        self.encoder = encoder
        self.pooling = pooling
        self.position_offset = position_offset
        self.device = device
        self.arena = arena
        self.head = head  # a classifier's: its logits are the output, [B, labels]
        self.sparse = sparse  # a SPLADE model's masked-LM head: its pooled weights are the output, [B, vocab]
        # BERT: pairs' second texts are of type 1, where the tokenizer gives types (token_types) and the model has them
        self.token_types = token_types and encoder.cfg.type_vocab_size > 1
        # sentence-transformers Dense modules after the pooling: (weight [in, out], bias, activation), float32, applied
        # to the pooled rows on the host (a [B, H] product: next to nothing beside the encoder)
        self.dense = dense or []
        self.dim = head.out.out_features if head is not None else sparse.decoder.out_features if sparse is not None \
            else self.dense[-1][0].shape[1] if self.dense else encoder.cfg.hidden_size
        self.graphs: GraphedForward | None = None  # CUDA graphs of small batches (capture_graphs)

    def capture_graphs(self, max_tokens: int, max_sequences: int) -> bool:
        """Serve batches of up to `max_tokens` tokens and `max_sequences` sequences by replaying CUDA graphs
        (models/graphs.py); returns whether they are on. Only on CUDA with the flash attention path (fp16/bf16)
        and for pooled outputs (not SPLADE), and not for models with a relative position bias (MPNet), decoder-only
        models, ModernBERT, NomicBERT or GTE."""
        if self.encoder.cfg.decoder is not None:
            log.info("CUDA graphs not used: not yet for decoder-only models (%s)", self.encoder.cfg.model_type)
            return False
        if self.encoder.cfg.modernbert is not None or self.encoder.cfg.rotary is not None:
            log.info("CUDA graphs not used: not yet for %s (its rotary positions are not yet checked under capture)",
                     self.encoder.cfg.model_type)
            return False
        if self.encoder.cfg.relative_attention_buckets:
            log.info("CUDA graphs not used: %s's relative position bias runs attention one sequence at a time, which "
                     "reads the batch's offsets on the host", self.encoder.cfg.model_type)
            return False
        dtype = next(self.encoder.parameters()).dtype
        heads = self.encoder.cfg.num_heads
        probe = torch.empty(1, heads, self.encoder.cfg.hidden_size // heads, dtype=dtype, device=self.device)
        if self.sparse is not None or not flash_eligible(probe) or not flash_agrees(self.device, dtype, probe.shape[-1]):
            log.info("CUDA graphs not used: they need CUDA, float16 or bfloat16, FlashAttention and pooled outputs")
            return False
        self.graphs = GraphedForward(self.encoder, self.pooling, self.head, self.position_offset, self.token_types,
                                     max_tokens, max_sequences, self.device, self._eager)
        return self.graphs.capture(self.encoder.cfg.vocab_size)

    @torch.inference_mode()
    def embed(self, sequences: list[list[int]], per_token: list[bool] | None = None,
              segments: list[int | None] | None = None) -> np.ndarray | list[np.ndarray]:
        if self.graphs is not None and not (per_token and any(per_token)):
            out = self.graphs.run(sequences, segments if self.token_types else None)
            if out is not None:
                return self._project(out, per_token)
        return self._project(self._eager(sequences, segments, per_token), per_token)

    def _project(self, out, per_token: list[bool] | None):
        """The pooled rows through the Dense modules (per-token states are the encoder's, as sentence-transformers'
        token_embeddings)."""
        if not self.dense:
            return out

        def dense(rows: np.ndarray) -> np.ndarray:
            rows = rows.astype(np.float32, copy=False)
            for weight, bias, activation in self.dense:
                rows = rows @ weight + bias if bias is not None else rows @ weight
                rows = DENSE_FUNCTIONS[activation](rows)
            return rows

        if isinstance(out, np.ndarray):
            return dense(out)
        return [row if per_token and per_token[i] else dense(row[None])[0] for i, row in enumerate(out)]

    @torch.inference_mode()
    def _eager(self, sequences: list[list[int]], segments: list[int | None] | None,
               per_token: list[bool] | None = None) -> np.ndarray | list[np.ndarray]:
        batch = PackedBatch.from_ids(sequences, self.position_offset, self.device, segments if self.token_types else None)
        if self.arena is None:
            return self._outputs(self.encoder(batch), batch, per_token)
        with self.arena.batch(batch.input_ids.shape[0]) as ws:
            hidden = self.encoder(batch, ws)  # [T, H], in the arena
            return self._outputs(hidden, batch, per_token)

    def _outputs(self, hidden: torch.Tensor, batch: PackedBatch, per_token: list[bool] | None) -> np.ndarray | list[np.ndarray]:
        if self.head is not None:  # logits from each sequence's first token (or, for some heads, the mean of all)
            if self.pooling == "last":  # a decoder's ScoreHead: its last token that is not the pad token
                rows = self.head.last_tokens(hidden, batch)
            else:
                rows = hidden[batch.cu_seqlens[:-1]] if self.pooling == "cls" else pool(hidden, batch, "mean").to(hidden.dtype)
            return self.head(rows).float().cpu().numpy()
        if self.sparse is not None:  # SPLADE: per-token states are not offered (TEI refuses /embed_all too)
            return self.sparse(hidden, batch).cpu().numpy()
        pooled = pool(hidden, batch, self.pooling).cpu().numpy()  # [B, H]
        if not per_token or not any(per_token):
            return pooled
        out = list(pooled)
        cu = batch.cu_seqlens
        for i in (i for i, flag in enumerate(per_token) if flag):
            # A copy: on the CPU .float().cpu().numpy() would share memory with `hidden` (the arena's).
            out[i] = np.array(hidden[cu[i]:cu[i + 1]].float().cpu().numpy(), copy=True)
        return out


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16 or AMX), where bfloat16 GEMMs run about
    twice as fast as float32 ones; elsewhere oneDNN emulates them, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def served_name(path: str | None, name: str | None) -> str:
    """The name a model is served under: `name`, else its folder's name (the embedded model's own name)."""
    # `.` and `..` name their folder; a link keeps its own name (abspath does not follow it)
    return name or (DEFAULT_MODEL_NAME if not path else Path(os.path.abspath(path)).name)


def load_model(path: str | None, name: str | None = None, device: str = "cpu", dtype: str = "float32",
               max_input_length: int | None = None, pooling: str | None = None, normalize: bool | None = None,
               matryoshka_dimensions: list[int] | None = None, memory_arena: bool = True, arena_min_chunk_mib: float = 2.0,
               arena_release_after: int = 64, default_prompt_name: str | None = None, cuda_graph_max_tokens: int = 0,
               max_batch_sequences: int = 64,
               classifier_from_token: list[str] | None = None) -> tuple[EncoderEmbedder, TextTokenizer, ModelInfo]:
    """Load a model folder (or the embedded default when path is None) ready to serve. On CUDA, batches of up to
    `cuda_graph_max_tokens` tokens and `max_batch_sequences` sequences replay CUDA graphs (0: never).
    classifier_from_token: a causal LM served as a re-ranker from its LM head (models/folder.py's token_classifier)."""
    folder_path = Path(path) if path else default_model_path()
    folder = token_classifier(read_model_folder(folder_path), classifier_from_token)
    cfg = folder.encoder
    check_model_settings(folder, device, dtype, max_input_length, pooling, default_prompt_name,
                         matryoshka_dimensions=matryoshka_dimensions)
    st_limit = folder.pooling.max_seq_length or tokenizer_max_length(folder_path)  # sentence-transformers' own rule
    limit = min(x for x in (cfg.max_input_length, st_limit, max_input_length) if x)
    torch_device = torch.device(device)
    if torch_device.type == "cpu" and cuda.emulating():
        log.warning("TURBOSERVE_EMULATE_CUDA: the CUDA code path runs on the CPU emulator (kernels/emulate.py), "
                    "for checking it without a GPU; it is far slower than the CPU path")
    elif torch_device.type == "cpu" and dtype == "bfloat16" and not cpu_has_bf16():
        log.warning("model.dtype=bfloat16 on a CPU without native bfloat16 instructions (avx512_bf16, amx_bf16): "
                    "it computes, but slower than float32")
    started = time.perf_counter()
    take = reader(folder.weights)  # the files are read once, for the encoder and any head
    encoder = load_encoder(cfg, folder.weights, take, getattr(torch, dtype)).to(device=torch_device)
    head = None if folder.head is None else load_head(folder.head, cfg, take).to(device=torch_device, dtype=getattr(torch, dtype))
    mode = pooling or ("splade" if folder.mlm is not None else folder.pooling.mode)
    if folder.pooling.guessed and pooling is None and folder.mlm is None and folder.head is None:
        causal = cfg.decoder is not None and cfg.decoder.causal
        mode = "last" if causal else mode  # what vLLM guesses for a causal embedder (only its last token sees all)
        log.warning("%s has no sentence-transformers modules.json: pooling by %s, as %s does for such a folder; set "
                    "model.pooling (mean, cls, last) to choose", folder_path, mode, "vLLM" if causal else "SentenceTransformer")
    sparse = None
    if mode == "splade":
        sparse = load_mlm_head(folder.mlm, cfg, take).to(device=torch_device, dtype=getattr(torch, dtype))
        normalize = False  # SPLADE weights are not normalised (TEI refuses normalize for them)
    del take  # the files' tensors: copied into the modules
    log.info("loaded %s (%s, %d layers) in %.2fs", folder_path, cfg.model_type, cfg.num_layers, time.perf_counter() - started)
    if head is not None:
        mode, normalize = folder.head.pooling, False
    arena = None
    if memory_arena:
        with torch.inference_mode():
            arena = new_arena(encoder.record_forward, torch_device, arena_min_chunk_mib, arena_release_after)
    tokenizer = TextTokenizer(folder.tokenizer_file, limit, cfg.vocab_size, lowercase=folder.pooling.lowercase)
    dense = _dense_layers(folder.pooling.dense)
    embedder = EncoderEmbedder(encoder, mode, cfg.position_offset, torch_device, arena, head, sparse, dense,
                               tokenizer_gives_token_types(folder_path))
    sizes = tuple(matryoshka_dimensions or cfg.matryoshka_dimensions)  # each fits embedder.dim: check_model_settings
    if cuda_graph_max_tokens and torch_device.type == "cuda":
        embedder.capture_graphs(cuda_graph_max_tokens, max_batch_sequences)
    info = ModelInfo(
        name=served_name(path, name),
        path=str(folder_path),
        model_type=cfg.model_type,
        dim=embedder.dim,
        max_input_length=limit,
        pooling=mode,
        normalize=folder.pooling.normalize if normalize is None else normalize,
        matryoshka_dimensions=sizes,
        dtype=dtype,
        device=str(torch_device),
        prompts=dict(folder.pooling.prompts),
        default_prompt_name=default_prompt_name or folder.pooling.default_prompt_name,
        labels=folder.head.labels if folder.head is not None else (),
    )
    return embedder, tokenizer, info


DENSE_FUNCTIONS = {"tanh": np.tanh, "identity": lambda x: x, "relu": lambda x: np.maximum(x, 0, dtype=np.float32),
                   "sigmoid": lambda x: (1 / (1 + np.exp(-x))).astype(np.float32)}


def _dense_layers(layers) -> list[tuple[np.ndarray, np.ndarray | None, str]]:
    """The folder's Dense modules as float32 arrays (their shapes checked by check_model_settings)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    out = []
    for layer in layers:
        tensors = load_file(str(layer.weights))
        out.append((np.ascontiguousarray(tensors["linear.weight"].T, dtype=np.float32),
                    tensors["linear.bias"].astype(np.float32) if layer.bias else None, layer.activation))
    return out


def finish_embedding(vector: np.ndarray, normalize: bool, dimensions: int | None = None) -> np.ndarray:
    """Truncate to `dimensions` (Matryoshka), then L2-normalise when asked (TEI's order: `normalize: false` keeps the
    cut vector as it is, as sentence-transformers' truncate_dim without normalize_embeddings)."""
    if dimensions is not None and dimensions < vector.shape[-1]:
        vector = vector[..., :dimensions]
    if normalize:
        norm = np.linalg.norm(vector, axis=-1, keepdims=True)
        vector = vector / np.maximum(norm, 1e-12)
    return vector.astype(np.float32, copy=False)


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    import platform  # noqa: PLC0415

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            found = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), None)
    except OSError:
        found = None
    return found or platform.processor() or platform.machine() or "unknown"


def runtime_facts(info: ModelInfo) -> dict:
    """What a measured cost depends on besides the model: device name, software versions, threads."""
    device = torch.device(info.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    facts = {"device": info.device, "device_name": name, "dtype": info.dtype, "torch": torch.__version__,
             "threads": torch.get_num_threads()}
    if device.type == "cpu" and cuda.emulating():
        facts["cuda_emulated"] = True  # a cost measured through the emulator is nobody else's
    return facts
