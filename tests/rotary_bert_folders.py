"""Small NomicBERT and GTE folders for tests, made here (nothing downloaded): a seeded random NomicBertModel or GteModel
saved by transformers (which writes the weights under the custom code's names, as the published checkpoints hold them,
and config.json in its own layout), with a BERT-style WordPiece tokenizer.json ([CLS] $A [SEP], pairs with token
types), laid out for sentence-transformers: mean pooling for NomicBERT (nomic-embed-text's), the first token's for GTE
(gte-*-v1.5's), then Normalize. `original_config` rewrites config.json as the custom code's (and TEI's) layout."""

from __future__ import annotations

import json
from pathlib import Path

from tests.mpnet_folders import WORDS, wordpiece_tokenizer_json

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
VOCAB = [*SPECIALS, *WORDS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), *"abcdefghijklmnopqrstuvwxyz"]
HIDDEN, HEADS, INTERMEDIATE, LAYERS = 64, 4, 96, 2


def tokenizer_json(folder: Path) -> None:
    """BERT's special tokens: [CLS] $A [SEP], pairs [CLS] $A [SEP] $B [SEP] (the second text of type 1)."""
    wordpiece_tokenizer_json(folder, VOCAB, "[CLS]", "[SEP]", "[CLS] $A:0 [SEP]:0 $B:1 [SEP]:1",
                             {"cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
                              "mask_token": "[MASK]"}, 2048, SPECIALS)


def _config(kind: str, **overrides):
    """transformers' NomicBertConfig or GteConfig of the test shape."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    make = tf.NomicBertConfig if kind == "nomic" else tf.GteConfig
    return make(**{"vocab_size": len(VOCAB), "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                   "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE, "pad_token_id": 0,
                   "hidden_dropout_prob": 0.0, **overrides})


def _randomised(model, seed: int):
    """Weights drawn larger than transformers' init (std 0.1; every LayerNorm weight 1 +- 0.1, bias 0 +- 0.1) so that
    attention, the token types and every norm matter."""
    import torch  # noqa: PLC0415

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = any(n in name for n in ("LayerNorm", "layernorm", "emb_ln"))
            p.normal_(1.0, 0.1) if norm and name.endswith("weight") else p.normal_(0, 0.1)
    return model.eval()


def _st_layout(folder: Path, pooling: str, max_seq_length: int) -> None:
    tokenizer_json(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                              f"pooling_mode_{pooling}_token{'s' * (pooling == 'mean')}": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))


def rotary_bert_folder(root: Path, kind: str, name: str | None = None, seed: int = 0, max_seq_length: int = 512,
                       **overrides) -> Path:
    """A sentence-transformers NomicBERT (kind "nomic") or GTE ("gte") folder; overrides: the config's."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / (name or kind)
    make = tf.NomicBertModel if kind == "nomic" else tf.GteModel
    _randomised(make(_config(kind, **overrides)), seed).save_pretrained(folder, safe_serialization=True)
    _st_layout(folder, "mean" if kind == "nomic" else "cls", max_seq_length)
    return folder


def gte_reranker_folder(root: Path, seed: int = 0, typed: bool = True) -> Path:
    """A GteForSequenceClassification with one label (a cross-encoder, as gte-multilingual-reranker-base is) and two
    token types; its tokenizer hands the model a pair's token types when `typed` (as BERT's), else none (as
    XLM-RoBERTa's and the generic fast tokenizer's in transformers 5: every token of type 0)."""
    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / f"gte-reranker{'-typed' * typed}"
    model = tf.GteForSequenceClassification(_config("gte", num_labels=1, type_vocab_size=2))
    _randomised(model, seed).save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    if typed:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config["model_input_names"] = ["input_ids", "token_type_ids", "attention_mask"]
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def original_config(folder: Path) -> dict:
    """config.json of the folder as the custom code writes it: nomic-embed-text's (n_embd, ..., rotary_emb_base,
    activation_function "swiglu") or Alibaba-NLP's "new" GTE (rope_theta at the top level, auto_map)."""
    cfg = json.loads((folder / "config.json").read_text())
    theta = cfg["rope_parameters"]["rope_theta"]
    if cfg["model_type"] == "nomic_bert":
        return {"architectures": ["NomicBertModel"], "model_type": "nomic_bert", "activation_function": "swiglu",
                "auto_map": {"AutoConfig": "nomic-ai/nomic-bert-2048--configuration_hf_nomic_bert.NomicBertConfig"},
                "n_embd": cfg["hidden_size"], "n_head": cfg["num_attention_heads"], "n_inner": cfg["intermediate_size"],
                "n_layer": cfg["num_hidden_layers"], "n_positions": 8192, "max_trained_positions": 2048,
                "layer_norm_epsilon": cfg["layer_norm_eps"], "rotary_emb_base": theta, "rotary_emb_fraction": 1.0,
                "rotary_emb_interleaved": False, "rotary_scaling_factor": None, "prenorm": False,
                "qkv_proj_bias": False, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "causal": False,
                "type_vocab_size": cfg["type_vocab_size"], "vocab_size": cfg["vocab_size"], "pad_token_id": 0}
    return {"architectures": ["NewModel"], "model_type": "new",
            "auto_map": {"AutoConfig": "Alibaba-NLP/new-impl--configuration.NewConfig"},
            **{k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                   "hidden_act", "layer_norm_eps", "type_vocab_size", "vocab_size", "pad_token_id")},
            "max_position_embeddings": 8192, "position_embedding_type": "rope", "rope_theta": theta,
            "rope_scaling": None, "layer_norm_type": "layer_norm", "logn_attention_scale": False, "pack_qkv": True,
            "unpad_inputs": True, "use_memory_efficient_attention": True}
