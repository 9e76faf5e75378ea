"""Small cross-encoder and classifier folders for tests, made here (nothing downloaded): a randomly initialised
BertForSequenceClassification or XLMRobertaForSequenceClassification saved by transformers, with the embedded
MiniLM's BERT tokenizer (the RoBERTa-style one keeps the same vocabulary and tokenizer: only the weights' names,
the position offset and the head differ)."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


SIZES = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
         # the shape of cross-encoder/ms-marco-MiniLM-L-6-v2 (the benchmark's)
         "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)}


def cross_encoder_folder(root: Path, labels: tuple[str, ...] = ("LABEL_0",), style: str = "bert", seed: int = 0,
                         size: str = "tiny") -> Path:
    """A folder that transformers, sentence-transformers' CrossEncoder and turboserve all load."""
    import torch  # noqa: PLC0415

    from models.config import default_model_path  # noqa: PLC0415
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / f"{style}-{size}-{len(labels)}-labels"
    dims = dict(vocab_size=30522, **SIZES[size], id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)})
    torch.manual_seed(seed)
    if style == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(max_position_embeddings=512, **dims))
    else:
        model = tf.XLMRobertaForSequenceClassification(tf.XLMRobertaConfig(max_position_embeddings=514, pad_token_id=1,
                                                                          type_vocab_size=1, **dims))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # scores spread over (0, 1), not all near 0.5
    model.eval().save_pretrained(folder, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_path() / name, folder / name)
    return folder


def splade_folder(root: Path, style: str = "bert", seed: int = 0, saved_by: str = "transformers") -> Path:
    """A small SPLADE model: a randomly initialised BertForMaskedLM (or DistilBertForMaskedLM) with the embedded
    MiniLM's tokenizer; saved by transformers, or by sentence-transformers' SparseEncoder (its modules.json names
    the SpladePooling)."""
    import torch  # noqa: PLC0415

    from models.config import default_model_path  # noqa: PLC0415
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / f"splade-{style}-{saved_by}"
    torch.manual_seed(seed)
    if style == "bert":
        model = tf.BertForMaskedLM(tf.BertConfig(vocab_size=30522, max_position_embeddings=512, **SIZES["tiny"]))
    else:
        model = tf.DistilBertForMaskedLM(tf.DistilBertConfig(vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    plain = folder if saved_by == "transformers" else root / f"splade-{style}-plain"
    model.eval().save_pretrained(plain, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_path() / name, plain / name)
    if saved_by != "transformers":
        from sentence_transformers import SparseEncoder  # noqa: PLC0415
        from sentence_transformers.sparse_encoder.models import MLMTransformer, SpladePooling  # noqa: PLC0415

        SparseEncoder(modules=[MLMTransformer(str(plain)), SpladePooling(pooling_strategy="max")], device="cpu").save(str(folder))
    return folder
