"""A model folder as a whole: the files it must hold, its safetensors headers (every tensor's shape) and tokenizer
checked, and its configs (models/config.py, models/st_modules.py) gathered into a ModelFolder; a causal LM's folder made
a re-ranker by model.classifier_from_token (`token_classifier`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from models.config import (
    SCORE_HEAD_TYPES,
    ClassifierHead,
    EncoderConfig,
    MaskedLMHead,
    ModelFolderError,
    classifier_head,
    mlm_head,
    read_json,
    score_pad_token_id,
)
from models.st_modules import PoolingConfig, pooling_from_st

# Weight files torch.load would unpickle (arbitrary code on load): never read, only named in the refusal.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file starts


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
    cfg = read_json(path / "config.json")
    encoder, pooling, head, mlm = EncoderConfig.from_dict(cfg), pooling_from_st(path), classifier_head(cfg), mlm_head(cfg)
    shapes = _weight_shapes(weights)
    dense_shapes = [_weight_shapes([dense.weights]) for dense in pooling.dense]
    _check_tokenizer(path / "tokenizer.json")
    return ModelFolder(path=path, encoder=encoder, pooling=pooling, weights=weights, shapes=shapes,
                       dense_shapes=dense_shapes, head=head, mlm=mlm)


def token_classifier(folder: ModelFolder, tokens: list[str] | None, section: str = "model") -> ModelFolder:
    """The folder, served as a one-label re-ranker from its LM head where `tokens` (model.classifier_from_token) is set,
    as vLLM serves the original Qwen3-Reranker (Qwen3ForCausalLM, ["no", "yes"]): the "score" head and its rule for the
    token it reads (the last that is not config.json's pad_token_id), its weight the LM head's row of the one token, or
    the second's less the first's (models/weights.py). Unchanged where `tokens` is None; ModelFolderError, naming the
    setting, for a folder it does not apply to or a token that is not one id of the folder's tokenizer."""
    if tokens is None:
        return folder
    setting = f"{section}.classifier_from_token={list(tokens)!r}"
    model_type = folder.encoder.model_type
    if model_type not in SCORE_HEAD_TYPES:
        raise ModelFolderError(f"{setting}: a re-ranker is made from the LM head of a Qwen2, Qwen3, Mistral or Llama "
                               f"causal LM; {folder.path} is a {model_type} model")
    if folder.head is not None:
        raise ModelFolderError(f"{setting}: {folder.path} has a classifier head of its own (a *ForSequenceClassification "
                               "folder): serve it without classifier_from_token")
    if not 1 <= len(tokens) <= 2:
        raise ModelFolderError(f"{setting}: one token (the score is its logit) or two ([a, b]: b's logit less a's) are "
                               f"taken, not {len(tokens)}")
    from tokenizers import Tokenizer  # noqa: PLC0415

    tokenizer = Tokenizer.from_file(str(folder.tokenizer_file))
    ids = tuple(_token_id(tokenizer, token, setting, folder.encoder.vocab_size) for token in tokens)
    pad = score_pad_token_id(read_json(folder.path / "config.json"))
    return replace(folder, head=ClassifierHead("score", ("LABEL_0",), "last", pad, from_tokens=ids))


def _token_id(tokenizer, token: str, setting: str, vocab_size: int) -> int:
    """The one id of `token`: its vocabulary entry (as vLLM's convert_tokens_to_ids finds it), else its encoding when
    that is one known id; ModelFolderError otherwise, or when the LM head has no such row."""
    found = tokenizer.token_to_id(token)
    if found is None:
        ids = tokenizer.encode(token, add_special_tokens=False).ids
        unk = getattr(tokenizer.model, "unk_token", None)
        if len(ids) == 1 and (unk is None or ids[0] != tokenizer.token_to_id(unk)):
            found = ids[0]
        else:
            why = "an unknown token" if len(ids) == 1 else f"{len(ids)} tokens"
            raise ModelFolderError(f"{setting}: {token!r} is not one token of the tokenizer's vocabulary (it encodes as "
                                   f"{why})")
    if found >= vocab_size:
        raise ModelFolderError(f"{setting}: {token!r} is token {found}, past the LM head's {vocab_size} rows")
    return found


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
