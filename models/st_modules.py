"""sentence-transformers' side of a model folder, read into a PoolingConfig: modules.json (Pooling, SpladePooling,
Dense, Normalize), the Pooling and Dense modules' configs, sentence_bert_config.json and
config_sentence_transformers.json (named prompts)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.config import ModelFolderError, read_json

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


def pooling_from_st(path: Path) -> PoolingConfig:
    """Read sentence-transformers' modules.json; a plain transformers folder pools by mean, unnormalised (what
    SentenceTransformer makes of it, with a warning; TEI asks for --pooling instead). A module
    this server does not compute (Dense, LayerNorm, ...) is refused: its vectors would silently differ."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return PoolingConfig(mode="mean", guessed=True)
    mode, normalize, include_prompt, dense, pooled = "cls", False, True, [], False
    for module in read_json(modules_file):
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
            pool = read_json(path / module.get("path", "") / "config.json")
            if pool.get("pooling_strategy", "max") != "max" or pool.get("activation_function", "relu") != "relu":
                raise ModelFolderError(f"unsupported SPLADE pooling in {path} (max of relu is): {pool}")
            mode, pooled = "splade", True
        elif kind.endswith("Pooling"):
            pooled = True
            pool = read_json(path / module.get("path", "") / "config.json")
            mode = _pooling_mode(pool, path)
            include_prompt = pool.get("include_prompt", True)
        elif kind.endswith("Dense"):
            dense.append(_dense_layer(path / module.get("path", "")))
        elif kind.endswith("Normalize"):
            normalize = True
    st_cfg = read_json(path / "sentence_bert_config.json") if (path / "sentence_bert_config.json").exists() else {}
    max_len, lowercase = st_cfg.get("max_seq_length"), bool(st_cfg.get("do_lower_case", False))
    prompts_file = path / "config_sentence_transformers.json"
    st = read_json(prompts_file) if prompts_file.exists() else {}
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
    cfg = read_json(folder / "config.json")
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
