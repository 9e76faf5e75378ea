"""Small Mistral and Llama embedder folders for tests, made here (nothing downloaded): a seeded random MistralModel
(e5-mistral-7b-instruct's, SFR-Embedding-Mistral's architecture) or LlamaModel saved by transformers, laid out as
tests/qwen_folders.py lays out Qwen's: its word-level tokenizer, last-token pooling, Normalize, a query prompt."""

from __future__ import annotations

from pathlib import Path

from tests.qwen_folders import HEADS, HIDDEN, KV_HEADS, VOCAB, saved_embedder


def mistral_folder(root: Path, model_type: str = "mistral", name: str | None = None, seed: int = 0,
                   max_seq_length: int = 512, **config) -> Path:
    """A sentence-transformers folder of a small MistralModel or LlamaModel (hidden 64, 2 layers, 4 query heads over
    2 key/value heads), its weights drawn by saved_embedder. config: MistralConfig's or LlamaConfig's keys over these
    (sliding_window, whose transformers default is 4096; attention_bias, mlp_bias, head_dim)."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    torch.manual_seed(seed)
    common = dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, intermediate_size=96, max_position_embeddings=4096,
                  rope_theta=50000.0, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    config_class, model_class = {"mistral": (tf.MistralConfig, tf.MistralModel),
                                 "llama": (tf.LlamaConfig, tf.LlamaModel)}[model_type]
    model = model_class(config_class(**{**common, **config}))
    return saved_embedder(model, root / (name or model_type), max_seq_length)
