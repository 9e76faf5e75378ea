"""Tokenizer wrapper: special tokens, truncation both ways, over-length and token-id checks."""

from __future__ import annotations

import pytest

from models.config import default_model_path
from models.tokenizer import InputTooLong, InvalidTokens, TextTokenizer


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer(default_model_path() / "tokenizer.json", 16, 30522)


def test_adds_special_tokens_without_padding(tok):
    a, b = tok.encode(["hello", "hello world again"])
    assert a.ids[0] == 101 and a.ids[-1] == 102 and len(a.ids) == 3
    assert len(b.ids) == 5 and not a.truncated


def test_over_length_refused_with_real_length(tok):
    text = " ".join(["word"] * 40)
    with pytest.raises(InputTooLong) as err:
        tok.encode(["short", text])
    assert err.value.index == 1 and err.value.length == 42 and err.value.limit == 16


@pytest.mark.parametrize("direction", ["right", "left"])
@pytest.mark.parametrize("words", [17, 300, 2500])
def test_reported_length_is_the_untruncated_count(tok, direction, words):
    """The length in the refusal is counted from the truncated encoding's overflow (not a second tokenization):
    it equals the whole text's token count, multi-token words and the short (encode) and long (batch) paths alike."""
    vocab = "tokenization ünïcödé 日本語 emoji😀 deep-learning, is fun!".split()
    text = " ".join(vocab[i * 7 % len(vocab)] for i in range(words))
    whole = len(tok._full.encode(text).ids)
    with pytest.raises(InputTooLong) as err:
        tok.encode([text], direction=direction)
    assert err.value.length == whole > 16


def test_truncation_keeps_special_tokens_and_chosen_end(tok):
    text = " ".join(str(i) for i in range(40))
    right = tok.encode([text], truncate=True, direction="right")[0]
    left = tok.encode([text], truncate=True, direction="left")[0]
    assert len(right.ids) == len(left.ids) == 16 and right.truncated
    assert right.ids[0] == left.ids[0] == 101 and right.ids[-1] == left.ids[-1] == 102
    assert tok._full.decode(right.ids).startswith("0 1 2")
    assert tok._full.decode(left.ids).endswith("38 39")


def test_unicode_and_control_characters(tok):
    out = tok.encode(["\u0000\u0007", "😀 日本語 Ünïcödé", "\t\n"])
    assert all(e.ids[0] == 101 and e.ids[-1] == 102 for e in out)


def test_token_id_checks(tok):
    assert tok.check_ids([[0, 30521]])[0].ids == [0, 30521]
    with pytest.raises(InvalidTokens, match="outside the vocabulary"):
        tok.check_ids([[30522]])
    with pytest.raises(InvalidTokens, match="empty"):
        tok.check_ids([[]])
    with pytest.raises(InputTooLong):
        tok.check_ids([list(range(17))])


def test_tokenizers_for_request_limits_are_few_and_the_recent_ones_kept(tok):
    """vLLM's truncate_prompt_tokens makes a tokenizer copy per limit (the vocabulary each: 6 MB for MiniLM's): a
    client cycling through limits keeps at most CAPPED_COPIES of them, the ones used last (64 were kept, then all
    dropped at once)."""
    from models.tokenizer import CAPPED_COPIES  # noqa: PLC0415

    text = " ".join(str(i) for i in range(40))
    for limit in range(3, 16):
        assert len(tok.encode([text], truncate=True, limit=limit)[0].ids) == limit
        assert len(tok._capped) <= CAPPED_COPIES
    kept = tok._tokenizer("right", 15)
    assert all(tok._tokenizer("right", 15) is kept for _ in range(3))  # reused, not remade
    for limit in range(3, 3 + CAPPED_COPIES - 1):
        tok._tokenizer("right", limit)
    assert tok._tokenizer("right", 15) is kept  # recently used: still there
