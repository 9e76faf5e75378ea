"""Small MPNet folders for tests, made here (nothing downloaded): a seeded random MPNetModel saved by transformers, with
a WordPiece tokenizer.json built by the `tokenizers` library around MPNet's special tokens (<s>=0, <pad>=1, </s>=2,
<unk>=3; <s> $A </s>), laid out for sentence-transformers (mean pooling, then Normalize)."""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the quick brown fox jumps over lazy dog a cat sat on mat paris is capital of france deep learning models "
         "embed text into vectors search rank retrieve query document sentence word token position bias relative "
         "attention head layer norm hidden state mean pooling server batch packed sequence long short hello world "
         "red green blue one two three four five six seven eight nine ten").split()
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# a small vocabulary (about 150 words): the server profiles and serves it as it does a real one
VOCAB = [*SPECIALS, *WORDS, *(f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"), *"abcdefghijklmnopqrstuvwxyz"]
HIDDEN, HEADS = 64, 4


def wordpiece_tokenizer_json(folder: Path, vocab: list[str], first: str, last: str, pair: str, roles: dict[str, str],
                             max_length: int, specials: tuple[str, ...] = ()) -> None:
    """tokenizer.json (and the tokenizer_config.json transformers' AutoTokenizer reads): a lower-casing WordPiece
    over `vocab`, each text as `first $A last` (pairs by `pair`); roles: tokenizer_config's special tokens (unk_token
    included); specials: tokens marked special."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors  # noqa: PLC0415

    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token=roles["unk_token"]))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single=f"{first} $A {last}", pair=pair,
                                                       special_tokens=[(first, ids[first]), (last, ids[last])])
    tok.decoder = decoders.WordPiece()
    if specials:
        tok.add_special_tokens(list(specials))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **roles, "model_max_length": max_length,
        "model_input_names": ["input_ids", "attention_mask"]}))


def tokenizer_json(folder: Path) -> None:
    """MPNet's special tokens: <s> $A </s>."""
    wordpiece_tokenizer_json(folder, VOCAB, "<s>", "</s>", "<s> $A </s> </s> $B </s>",
                             {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                              "unk_token": "<unk>", "pad_token": "<pad>"}, 512)


def mpnet_folder(root: Path, name: str = "mpnet", seed: int = 0, layers: int = 2) -> Path:
    """A sentence-transformers MPNet folder (2 layers, hidden 64, 4 heads, 514 positions). The weights are drawn
    larger than transformers' init (std 0.1, the relative bias std 1) so that attention, and the bias in it, matter."""
    import torch  # noqa: PLC0415

    from tests.hf_import import import_transformers  # noqa: PLC0415

    tf = import_transformers()
    folder = root / name
    torch.manual_seed(seed)
    config = tf.MPNetConfig(vocab_size=len(VOCAB), hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                            intermediate_size=128, max_position_embeddings=514, relative_attention_num_buckets=32,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2)
    model = tf.MPNetModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "LayerNorm" in pname:
                continue
            p.normal_(0, 1.0 if "relative_attention_bias" in pname else 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer_json(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling/config.json").write_text(json.dumps({"word_embedding_dimension": HIDDEN,
                                                              "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    return folder


def texts(lengths: tuple[int, ...], seed: int = 0) -> list[str]:
    """Texts of the given word counts (one token a word, so len + 2 tokens with <s> and </s>)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(n)) for n in lengths]
