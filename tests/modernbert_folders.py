"""Small ModernBERT folders for tests, made here (nothing downloaded): a seeded random ModernBertModel saved by
transformers, with a WordPiece tokenizer.json built by the `tokenizers` library around ModernBERT's special tokens
([CLS] $A [SEP]), laid out for sentence-transformers (mean pooling, then Normalize), as gte-modernbert-base's and
modernbert-embed-base's folders are."""

from __future__ import annotations

import json
from pathlib import Path

from tests.mpnet_folders import WORDS, wordpiece_tokenizer_json

SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
VOCAB = [*SPECIALS, *WORDS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), *"abcdefghijklmnopqrstuvwxyz"]
HIDDEN, HEADS = 64, 4
# 4 layers: global, local, local, global (every third global, from layer 0); local layers see 4 tokens either side
LAYERS, LOCAL_ATTENTION = 4, 8


def tokenizer_json(folder: Path) -> None:
    """ModernBERT's special tokens: [CLS] $A [SEP], no token types."""
    wordpiece_tokenizer_json(folder, VOCAB, "[CLS]", "[SEP]", "[CLS] $A [SEP] $B [SEP]",
                             {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                              "mask_token": "[MASK]"}, 8192, SPECIALS)


def modernbert_config(layers: int = LAYERS, local_attention: int = LOCAL_ATTENTION, **overrides):
    """transformers' ModernBertConfig of the test shape (hidden 64, 4 heads, GeGLU of 96)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    return tf.ModernBertConfig(**{
        "vocab_size": len(VOCAB), "hidden_size": HIDDEN, "intermediate_size": 96, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "local_attention": local_attention, "max_position_embeddings": 1024,
        "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2, **overrides})


def modernbert_folder(root: Path, name: str = "modernbert", seed: int = 0, max_seq_length: int = 512,
                      **overrides) -> Path:
    """A sentence-transformers ModernBERT folder. Weights are drawn larger than transformers' init (std 0.1; every
    LayerNorm weight 1 ± 0.1, and its bias, where the config gives it one, 0 ± 0.1) so that attention and every norm
    matter. overrides: ModernBertConfig's (norm_bias=True, hidden_activation=..., ...)."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / name
    torch.manual_seed(seed)
    model = tf.ModernBertModel(modernbert_config(**overrides)).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname and pname.endswith("weight") else p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                              "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


def modernbert_reranker_folder(root: Path, pooling: str = "cls", seed: int = 0, **overrides) -> Path:
    """A ModernBertForSequenceClassification with one label (a cross-encoder, as gte-reranker-modernbert-base is),
    its head reading the first token ("cls") or the mean of the tokens ("mean"); weights drawn as modernbert_folder's."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / f"modernbert-reranker-{pooling}"
    torch.manual_seed(seed)
    config = modernbert_config(num_labels=1, classifier_pooling=pooling, **overrides)
    model = tf.ModernBertForSequenceClassification(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname and pname.endswith("weight") else p.normal_(0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    return folder
