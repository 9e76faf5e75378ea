"""Small decoder-only embedder folders for tests, made here (nothing downloaded): a seeded random Qwen3Model or
Qwen2Model saved by transformers, with a word-level tokenizer.json whose template ends each text with <|endoftext|>
(as Qwen3-Embedding's does), laid out for sentence-transformers (last-token pooling, then Normalize) with a query
prompt, as Qwen3-Embedding's folder is."""

from __future__ import annotations

import json
from pathlib import Path

from tests.mpnet_folders import WORDS

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>")
VOCAB = [*SPECIALS, *WORDS, "instruct", "given", "find", "answer", ":", ",", ".", "?"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 32  # grouped-query, head_dim * heads != hidden as in Qwen3-0.6B
QUERY_PROMPT = "Instruct: given a query, find the answer\nQuery:"


def tokenizer_json(folder: Path, extra: tuple[str, ...] = ()) -> None:
    """tokenizer.json (and the config transformers' AutoTokenizer reads): words, then <|endoftext|> (id 0); `extra`
    words after VOCAB's."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate([*VOCAB, *extra])}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A <|endoftext|> $B <|endoftext|>",
                                                       special_tokens=[("<|endoftext|>", 0)])
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<unk>", "model_max_length": 32768, "model_input_names": ["input_ids", "attention_mask"]}))


def qwen_folder(root: Path, model_type: str = "qwen3", name: str | None = None, seed: int = 0, layers: int = 2,
                max_seq_length: int = 512, **config) -> Path:
    """A sentence-transformers folder of a small Qwen3 or Qwen2 model (hidden 64, 4 query heads over 2 key/value
    heads), its weights drawn by saved_embedder. config: Qwen3Config's or Qwen2Config's keys over these (rope_scaling)."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / (name or model_type)
    torch.manual_seed(seed)
    common = dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=96, max_position_embeddings=4096,
                  rope_theta=50000.0, rms_norm_eps=1e-6, eos_token_id=0, pad_token_id=0) | config
    if model_type == "qwen3":
        model = tf.Qwen3Model(tf.Qwen3Config(head_dim=HEAD_DIM, **common))
    else:
        model = tf.Qwen2Model(tf.Qwen2Config(**common))
    return saved_embedder(model, folder, max_seq_length)


def saved_embedder(model, folder: Path, max_seq_length: int = 512) -> Path:
    """Save a small transformers decoder `model` (its weights first redrawn from torch's current seed: std 0.1, the
    RMSNorm weights 1 ± 0.1, so that attention and every norm matter; biases included) into `folder` with
    tokenizer_json's tokenizer, laid out for sentence-transformers: last-token pooling, Normalize, a query prompt."""
    import torch  # noqa: PLC0415

    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname else p.normal_(0, 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": model.config.hidden_size,
                                                              "pooling_mode_lasttoken": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder
