"""Small decoder-only re-ranker and classifier folders for tests, made here (nothing downloaded): a seeded random
Qwen3ForSequenceClassification (Qwen3-Reranker converted to "seq-cls", as tomaarsen/Qwen3-Reranker-0.6B-seq-cls is),
Qwen2's (mxbai-rerank-v2's architecture), Mistral's or Llama's, saved by transformers with tests/qwen_folders.py's
tokenizer, whose pair template ends each text with <|endoftext|>: the pad token, which transformers' head skips; and a
Qwen3ForCausalLM, as the original Qwen3-Reranker is, whose tokenizer also has "yes" and "no"."""

from __future__ import annotations

from pathlib import Path

from tests.qwen_folders import HEAD_DIM, HEADS, HIDDEN, KV_HEADS, VOCAB, tokenizer_json

PAD = 0  # <|endoftext|>: the pad token of config.json and tokenizer_config.json, and what the template appends


def decoder_reranker_folder(root: Path, model_type: str = "qwen3", labels: tuple[str, ...] = ("LABEL_0",),
                            seed: int = 0, name: str | None = None, **config) -> Path:
    """A <model_type>ForSequenceClassification folder (hidden 64, 2 layers, 4 query heads over 2 key/value heads), a
    re-ranker with one label, a classifier with more; weights drawn as tests/qwen_folders.saved_embedder draws them
    (std 0.1, RMSNorm weights 1 ± 0.1) so that attention, every norm and the `score` head matter. config: the
    config class's keys over these (pad_token_id, attention_bias, ...)."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / (name or f"{model_type}-reranker-{len(labels)}")
    torch.manual_seed(seed)
    common = dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=96, max_position_embeddings=4096,
                  rope_theta=50000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=PAD, pad_token_id=PAD,
                  id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)})
    if model_type == "qwen3":
        common["head_dim"] = HEAD_DIM
    config_class, model_class = {"qwen3": (tf.Qwen3Config, tf.Qwen3ForSequenceClassification),
                                 "qwen2": (tf.Qwen2Config, tf.Qwen2ForSequenceClassification),
                                 "mistral": (tf.MistralConfig, tf.MistralForSequenceClassification),
                                 "llama": (tf.LlamaConfig, tf.LlamaForSequenceClassification)}[model_type]
    model = model_class(config_class(**{**common, **config}))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname else p.normal_(0, 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    return folder


YES_NO = ("yes", "no")  # words the causal LM's tokenizer has after VOCAB's


def causal_lm_folder(root: Path, tied: bool = False, seed: int = 0, name: str | None = None) -> Path:
    """A Qwen3ForCausalLM folder (the original Qwen3-Reranker's architecture), shaped and drawn as
    decoder_reranker_folder's; tied: tie_word_embeddings (transformers then saves no lm_head.weight)."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / (name or f"qwen3-causal-lm{'-tied' if tied else ''}")
    torch.manual_seed(seed)
    model = tf.Qwen3ForCausalLM(tf.Qwen3Config(
        vocab_size=len(VOCAB) + len(YES_NO), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=96, max_position_embeddings=4096,
        rope_theta=50000.0, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=PAD, pad_token_id=PAD,
        tie_word_embeddings=tied))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0, 0.1) if "norm" in pname else p.normal_(0, 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder, YES_NO)
    return folder
