"""Small EmbeddingGemma-shaped folders for tests, made here (nothing downloaded): a seeded random Gemma3TextModel
(bidirectional attention, sliding-window and full layers) saved by transformers, with a word-level tokenizer.json
whose template puts <bos> first and <eos> last (as EmbeddingGemma's does), laid out by sentence-transformers as
EmbeddingGemma's folder is: mean pooling, Dense (hidden -> 2 hidden, no bias, identity), Dense (2 hidden -> hidden, no
bias, identity), Normalize, and named prompts."""

from __future__ import annotations

import json
from pathlib import Path

from tests.mpnet_folders import WORDS

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")  # Gemma's ids: pad 0, eos 1, bos 2, unk 3
VOCAB = [*SPECIALS, *WORDS, "task", "search", "result", "query", "title", "none", "text", "|", ":", ",", ".", "?"]
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 64, 4, 2, 32  # grouped-query, head_dim * heads != hidden as in EmbeddingGemma
LAYER_TYPES = ("sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention")
SLIDING_WINDOW = 24  # config.json's; bidirectional, each token sees the 12 either side of it in a sliding layer
PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


def tokenizer_json(folder: Path) -> None:
    """tokenizer.json (and the config transformers' AutoTokenizer reads): <bos>, the words, <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 1)])
    tok.add_special_tokens(list(SPECIALS))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "model_max_length": 2048, "model_input_names": ["input_ids", "attention_mask"]}))


def gemma_model_folder(root: Path, name: str = "gemma-model", seed: int = 0, **overrides) -> Path:
    """A Gemma3TextModel folder (config.json, model.safetensors, the tokenizer): hidden 64, 4 query heads over 2
    key/value heads of 32, five layers (sliding, sliding, full, sliding, full), query_pre_attn_scalar 24 (not
    head_dim: the scale is exercised). Weights are drawn larger than transformers' init (std 0.1; the RMSNorm weights,
    which scale by 1 + weight, ± 0.1) so that attention and every norm matter."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / name
    torch.manual_seed(seed)
    config = dict(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=len(LAYER_TYPES),
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, intermediate_size=96,
                  max_position_embeddings=2048, layer_types=list(LAYER_TYPES), sliding_window=SLIDING_WINDOW,
                  query_pre_attn_scalar=24, use_bidirectional_attention=True, rms_norm_eps=1e-6,
                  rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = tf.Gemma3TextModel(tf.Gemma3TextConfig(**{**config, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    return folder


def gemma_folder(root: Path, name: str = "gemma", seed: int = 0, max_seq_length: int = 512) -> Path:
    """The sentence-transformers folder: gemma_model_folder's model, mean pooling, Dense 64 -> 128 and 128 -> 64
    (identity, no bias), Normalize, EmbeddingGemma's query and document prompts; saved by sentence-transformers."""
    import torch  # noqa: PLC0415
    from sentence_transformers import SentenceTransformer, models  # noqa: PLC0415

    base = gemma_model_folder(root, f"{name}-model", seed)
    torch.manual_seed(seed + 1)
    modules = [models.Transformer(str(base), max_seq_length=max_seq_length), models.Pooling(HIDDEN, "mean"),
               models.Dense(HIDDEN, 2 * HIDDEN, bias=False, activation_function=torch.nn.Identity()),
               models.Dense(2 * HIDDEN, HIDDEN, bias=False, activation_function=torch.nn.Identity()),
               models.Normalize()]
    folder = root / name
    SentenceTransformer(modules=modules, prompts=PROMPTS, device="cpu").save(str(folder))
    return folder
