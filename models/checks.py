"""Whether a model folder, with the model settings asked for, can be served on this machine: checked by the CLI
before the port opens, and again by models/runtime.py's load_model."""

from __future__ import annotations

import torch

from kernels import cuda
from models.config import ModelFolderError
from models.weights import check_weights


def dtype_refused(device: str, dtype: str, section: str = "model") -> str | None:
    """Why `dtype` cannot run on `device`, or None: float16 on a CPU (outside the CUDA emulator)."""
    if torch.device(device).type == "cpu" and dtype == "float16" and not cuda.emulating():
        return (f"{section}.dtype=float16 is not supported on CPU (no fast float16 GEMMs there); use bfloat16 or float32 "
                "(float16 runs on the CPU only under TURBOSERVE_EMULATE_CUDA=1)")
    return None


def check_model_settings(folder, device: str, dtype: str, max_input_length: int | None = None, pooling: str | None = None,
                         default_prompt_name: str | None = None, section: str = "model",
                         matryoshka_dimensions: list[int] | None = None) -> None:
    """ModelFolderError naming the setting, for settings this model folder or this machine cannot serve, and for
    weights that are missing or of the wrong shape: checked by the CLI before the port opens, and again at load.
    folder: models.folder.read_model_folder's."""
    if default_prompt_name is not None and default_prompt_name not in dict(folder.pooling.prompts):
        known = ", ".join(name for name, _ in folder.pooling.prompts) or "none"
        raise ModelFolderError(f"{section}.default_prompt_name={default_prompt_name!r} is not one of the model's prompts ({known})")
    if max_input_length and max_input_length > folder.encoder.max_input_length:
        raise ModelFolderError(f"{section}.max_input_length={max_input_length} exceeds the model's "
                               f"{folder.encoder.max_input_length} positions")
    try:
        where = torch.device(device)
    except RuntimeError:
        raise ModelFolderError(f"{section}.device={device!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if where.type not in ("cpu", "cuda"):
        raise ModelFolderError(f"{section}.device={device!r}: turboserve runs on cpu or cuda devices")
    if where.type == "cuda" and (not torch.cuda.is_available() or (where.index or 0) >= torch.cuda.device_count()):
        raise ModelFolderError(f"{section}.device={device!r}: no such CUDA device here "
                               f"({torch.cuda.device_count()} visible)")
    if refused := dtype_refused(device, dtype, section):
        raise ModelFolderError(refused)
    if dtype == "float16" and folder.encoder.model_type == "gemma3_text":  # Google's model card says so too
        raise ModelFolderError(f"{section}.dtype=float16: Gemma3's activations overflow float16 (its embeddings would be "
                               "inf or NaN); use bfloat16 or float32")
    if pooling == "splade" and folder.mlm is None:
        raise ModelFolderError(f"{section}.pooling=splade needs a *ForMaskedLM model (BERT or DistilBERT) with its "
                               "masked-LM head")
    _check_dense(folder, pooling)
    dim = output_dim(folder, pooling)
    sizes = list(matryoshka_dimensions or folder.encoder.matryoshka_dimensions)
    if any(size > dim or size < 1 for size in sizes):
        where = f"{section}.matryoshka_dimensions={sizes}" if matryoshka_dimensions else \
            f"config.json's matryoshka_dimensions {sizes}"
        raise ModelFolderError(f"{where}: each must be from 1 to the model's {dim}-dim output")
    try:
        check_weights(folder, pooling)
    except ModelFolderError as exc:
        raise ModelFolderError(f"{section}.path: {exc}") from None


def _check_dense(folder, pooling: str | None) -> None:
    """ModelFolderError unless the folder's Dense modules chain from the pooled size, with weights (from their
    headers) of the shapes their configs give."""
    layers = folder.pooling.dense
    if layers and (folder.head is not None or pooling == "splade" or (pooling is None and folder.mlm is not None)):
        raise ModelFolderError("a Dense module after a classifier or SPLADE head is not supported")
    size = folder.encoder.hidden_size
    for layer, shapes in zip(layers, folder.dense_shapes):
        weight, bias = shapes.get("linear.weight"), shapes.get("linear.bias")
        if layer.in_features != size or weight != (layer.out_features, layer.in_features) \
                or (layer.bias and bias != (layer.out_features,)):
            raise ModelFolderError(f"{layer.weights}: a Dense module of {layer.in_features} -> {layer.out_features} "
                                   f"after a {size}-dim vector, with weights of {weight}")
        size = layer.out_features


def output_dim(folder, pooling: str | None = None) -> int:
    """Size of the vectors the model serves (EncoderEmbedder.dim, known before loading): a classifier's labels, SPLADE's
    vocabulary, the last Dense module's output, else the encoder's hidden size."""
    if folder.head is not None:
        return len(folder.head.labels)
    if pooling == "splade" or (pooling is None and folder.mlm is not None):
        return folder.encoder.vocab_size
    return folder.pooling.dense[-1].out_features if folder.pooling.dense else folder.encoder.hidden_size
