"""Tokenization with the `tokenizers` library: no padding, explicit truncation, over-length detection."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tokenizers import Tokenizer, normalizers

Direction = Literal["right", "left"]
CAPPED_COPIES = 8  # tokenizers truncating below max_length kept (vLLM's truncate_prompt_tokens), least recent dropped
SHORT_TEXT_CHARS = 4096  # up to this, one text is tokenized by encode() (no thread pool); beyond, encode_batch


class InputTooLong(ValueError):
    """An input has more tokens than the limit and truncation was not asked for."""

    def __init__(self, index: int, length: int, limit: int):
        super().__init__(f"input {index} has {length} tokens, more than the limit of {limit}; shorten it or ask for truncation")
        self.index, self.length, self.limit = index, length, limit


class InvalidTokens(ValueError):
    """Token-id input that the model cannot take (empty, or ids outside the vocabulary)."""


class InvalidText(ValueError):
    """A text that is not valid Unicode: a lone UTF-16 surrogate (JSON's "\\ud800" escapes can carry one)."""


def check_texts(texts: list[str], what: str = "input", positions: list[int] | None = None) -> None:
    """InvalidText naming the first text with a lone surrogate (it has no UTF-8 form, and the tokenizer takes none);
    positions: each text's place in the request (default: its place in `texts`). Asked when the tokenizer refused a
    batch (its own error says only "must be str"), so texts that tokenize pay nothing."""
    for i, text in enumerate(texts):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidText(f"{what} {i if positions is None else positions[i]} is not valid Unicode: a lone surrogate (U+{ord(text[exc.start]):04X}) at "
                              f"character {exc.start}") from None


def _refused_texts(call, texts: list[str], what: str = "input", positions: list[int] | None = None):
    """call() (a tokenizer call on `texts`); if the tokenizer refuses them, InvalidText when a text is not valid
    Unicode, else the tokenizer's own error."""
    try:
        return call()
    except (TypeError, ValueError):
        check_texts(texts, what, positions)
        raise


def _untruncated_length(enc) -> int:
    """The token count of a single text before truncation, from its truncated encoding: each overflowing piece
    repeats the special tokens, so count only its own (not for pairs, whose pieces repeat the other text too)."""
    own = sum(len(piece.ids) - sum(piece.special_tokens_mask) for piece in [enc, *enc.overflowing])
    return own + sum(enc.special_tokens_mask)


@dataclass(frozen=True)
class Encoded:
    """Token ids of one input, with or without special tokens as the tokenizer adds them."""

    ids: list[int]
    truncated: bool
    segment: int | None = None  # a text pair's: where its second text's tokens (token type 1) start


class TextTokenizer:
    """Wraps one tokenizer.json; one copy per truncation direction, so nothing is mutated per call."""

    def __init__(self, tokenizer_file: str | Path, max_length: int, vocab_size: int, lowercase: bool = False):
        """lowercase: sentence-transformers' do_lower_case, as a Lowercase normalizer put first (offsets still
        count in the text as given)."""
        self.max_length = max_length
        self.vocab_size = vocab_size
        self._by_direction: dict[str, Tokenizer] = {}

        def load() -> Tokenizer:
            tok = Tokenizer.from_file(str(tokenizer_file))
            if lowercase:
                tok.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer else []))
            return tok

        for direction in ("right", "left"):
            tok = load()
            tok.no_padding()
            tok.enable_truncation(max_length, direction=direction)
            self._by_direction[direction] = tok
        self._full = load()
        self._full.no_padding()
        self._full.no_truncation()
        self._capped: dict[tuple[str, int], Tokenizer] = {}  # (direction, limit) -> a copy truncating there
        self._capped_lock = threading.Lock()

    def _tokenizer(self, direction: Direction, limit: int | None) -> Tokenizer:
        """The tokenizer truncating at max_length, or at a request's own `limit` below it (vLLM's
        truncate_prompt_tokens): a copy made once per limit, as a shared one must not change per call."""
        if limit is None or limit >= self.max_length:
            return self._by_direction[direction]
        key = (direction, limit)
        with self._capped_lock:  # tokenizing threads share the dict
            tok = self._capped.pop(key, None)
            if tok is not None:
                self._capped[key] = tok  # last used last
                return tok
        # A copy holds the whole vocabulary (6 MB and ~30 ms for MiniLM's): the few limits last used are kept (64
        # were: 390 MB for a client cycling through limits).
        tok = Tokenizer.from_str(self._by_direction[direction].to_str())
        tok.no_padding()
        tok.enable_truncation(limit, direction=direction)
        with self._capped_lock:
            self._capped[key] = tok
            while len(self._capped) > CAPPED_COPIES:
                self._capped.pop(next(iter(self._capped)))
        return tok

    def first_tokens(self, texts: list[str], count: int) -> list[str]:
        """Each text cut after its first `count` tokens (special tokens not counted), at the end of the last one kept
        in the text: Cohere's max_tokens_per_doc, applied to a document before it is paired with its query."""
        encodings = _refused_texts(lambda: self._full.encode_batch(texts, add_special_tokens=False), texts, "document")
        return [text if len(enc.ids) <= count else text[:enc.offsets[count - 1][1]] for text, enc in zip(texts, encodings)]

    def encode(self, texts: list[str], truncate: bool = False, direction: Direction = "right",
               positions: list[int] | None = None, limit: int | None = None) -> list[Encoded]:
        """Tokenize texts with special tokens. Over-long inputs raise InputTooLong unless truncate. positions: each
        text's place in the request, for error messages (default: its place in `texts`). limit: truncate (when
        asked) at this many tokens, special tokens included, instead of max_length."""
        tok = self._tokenizer(direction, limit)
        # One short text: encode() runs on this thread; encode_batch wakes the library's thread pool (~0.1 ms). But
        # encode() holds the GIL throughout, encode_batch does not: a long text in a worker thread would stop the
        # event loop (1.9 MB: 2 s without an answer to /health).
        single = len(texts) == 1 and len(texts[0]) <= SHORT_TEXT_CHARS
        encodings = _refused_texts(lambda: [tok.encode(texts[0])] if single else tok.encode_batch(texts),
                                   texts, "input", positions)
        out = []
        for i, enc in enumerate(encodings):
            truncated = bool(enc.overflowing)
            if truncated and not truncate:
                raise InputTooLong(i if positions is None else positions[i], _untruncated_length(enc), self.max_length)
            out.append(Encoded(list(enc.ids), truncated))
        return out

    def encode_pairs(self, pairs: list[tuple[str, str]], truncate: bool = False, direction: Direction = "right",
                     positions: list[int] | None = None, limit: int | None = None) -> list[Encoded]:
        """Tokenize (a, b) text pairs with the tokenizer's pair template ([CLS] a [SEP] b [SEP] for BERT), as
        cross-encoders take them; over-long pairs raise InputTooLong unless truncate (the longer text is cut).
        positions, limit: as encode's."""
        tok = self._tokenizer(direction, limit)
        out = []
        encodings = _refused_texts(lambda: tok.encode_batch(pairs), [a + b for a, b in pairs], "pair", positions)
        for i, enc in enumerate(encodings):
            if enc.overflowing and not truncate:
                raise InputTooLong(i if positions is None else positions[i], len(self._full.encode_batch([pairs[i]])[0].ids),
                                   self.max_length)
            # The template's own token types (BERT: 1 from the second text on; RoBERTa: none).
            segment = enc.type_ids.index(1) if 1 in enc.type_ids else None
            out.append(Encoded(list(enc.ids), bool(enc.overflowing), segment))
        return out

    def check_ids(self, sequences: list[list[int]], truncate: bool = False, direction: Direction = "right",
                  positions: list[int] | None = None, limit: int | None = None) -> list[Encoded]:
        """Validate pre-tokenized input: used as given (no special tokens added), as vLLM does; an over-long list
        raises InputTooLong unless truncate, which keeps its first (right) or last (left) max_length ids, as TEI
        cuts token-id inputs. positions: as encode's; limit: truncate (when asked) to this many ids instead."""
        keep = self.max_length if limit is None else min(limit, self.max_length)
        out = []
        for j, ids in enumerate(sequences):
            i = j if positions is None else positions[j]
            if not ids:
                raise InvalidTokens(f"input {i} is an empty list of token ids")
            self._check_vocabulary(ids, f"input {i}")
            if len(ids) > self.max_length and not truncate:
                raise InputTooLong(i, len(ids), self.max_length)
            over = len(ids) > keep
            if over:
                ids = ids[:keep] if direction == "right" else ids[len(ids) - keep:]
            out.append(Encoded(list(ids), over))
        return out

    def _check_vocabulary(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidTokens(f"{what} has token id {bad}, outside the vocabulary [0, {self.vocab_size})")

    def describe(self, texts: list[str], add_special_tokens: bool = True) -> list[list[dict]]:
        """TEI's /tokenize: per token its id, its text (the input's characters, or the special token itself),
        whether it is special, and its [start, stop) character offsets in the input (None for special tokens).
        Not truncated: this shows what the model would see before any truncation."""
        out = []
        encodings = _refused_texts(lambda: self._full.encode_batch(texts, add_special_tokens=add_special_tokens), texts)
        for text, enc in zip(texts, encodings):
            out.append([{"id": tid, "text": name, "special": True, "start": None, "stop": None} if special else
                        {"id": tid, "text": text[start:stop], "special": False, "start": start, "stop": stop}
                        for tid, (start, stop), special, name in
                        zip(enc.ids, enc.offsets, enc.special_tokens_mask, enc.tokens)])
        return out

    def pieces(self, text: str, add_special_tokens: bool = True) -> tuple[list[int], list[str]]:
        """(ids, the vocabulary's token strings, e.g. "##ing") of a text, untruncated: vLLM's /tokenize."""
        enc = _refused_texts(lambda: self._full.encode_batch([text], add_special_tokens=add_special_tokens)[0], [text])
        return enc.ids, enc.tokens

    def decode(self, sequences: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """TEI's /decode: the text of each list of token ids; InvalidTokens for an id outside the vocabulary."""
        for i, ids in enumerate(sequences):
            self._check_vocabulary(ids, f"ids {i}")
        return self._full.decode_batch(sequences, skip_special_tokens=skip_special_tokens)
