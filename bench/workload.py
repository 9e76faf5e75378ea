"""Deterministic mixed-length English text workload, built without any download.

The corpus is the docstrings of a fixed list of standard-library modules (and of their public
classes and functions), read with `inspect.getdoc`, cleaned down to plain English words. Texts are
runs of consecutive corpus words whose token count, measured with the served model's own
tokenizer and counting the special tokens ([CLS] ... [SEP]), hits a requested length exactly.

    >>> from bench.workload import make_texts, count_tokens
    >>> texts = make_texts(100, min_tokens=8, max_tokens=256, seed=0)
    >>> count_tokens(texts)[:3]

The same (n, min_tokens, max_tokens, seed), Python version and tokenizer always give the same
texts. Used by bench/loadgen.py and meant for the scheduler's trace simulator as well.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Pure-Python standard-library modules with long, prose-heavy docstrings. Fixed order: determinism.
CORPUS_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib",
    "email.message", "enum", "fractions", "functools", "gettext", "glob", "heapq", "hmac",
    "http.client", "http.server", "inspect", "ipaddress", "json", "logging", "mailbox", "os",
    "pathlib", "pickle", "pprint", "queue", "random", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "zipfile",
)

# A word is letters (with inner apostrophes or hyphens), optionally ending in one punctuation mark.
_WORD = re.compile(r"^[A-Za-z][a-z]*(?:['-][a-z]+)*[.,;:!?]?$")
# Docstring lines that are code, doctest or tables rather than prose.
_CODE_LINE = re.compile(r"^\s*(>>>|\.\.\.|[-=~*]{3,}|\||\$|#)")


def _docstrings(module_name: str) -> list[str]:
    """Docstrings of a module and its public members (methods included), in a fixed order."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    docs = [inspect.getdoc(module) or ""]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", module_name) != module_name:
            continue
        if inspect.isclass(member) or inspect.isfunction(member):
            docs.append(inspect.getdoc(member) or "")
            if inspect.isclass(member):
                for attr, value in sorted(vars(member).items()):
                    if not attr.startswith("_") and inspect.isfunction(value):
                        docs.append(inspect.getdoc(value) or "")
    return [d for d in docs if d]


@lru_cache(maxsize=1)
def corpus_words() -> tuple[str, ...]:
    """The corpus as a tuple of plain English words (typically tens of thousands), in a fixed order."""
    words: list[str] = []
    for module_name in CORPUS_MODULES:
        for doc in _docstrings(module_name):
            for line in doc.splitlines():
                if _CODE_LINE.match(line):
                    continue
                words.extend(w for w in line.split() if _WORD.match(w))
    if len(words) < 1000:
        raise RuntimeError(f"the standard-library corpus is too small ({len(words)} words)")
    return tuple(words)


@lru_cache(maxsize=1)
def corpus_paragraphs() -> tuple[str, ...]:
    """The docstrings' paragraphs (blank-line separated, at least three words), in a fixed order: prose of the lengths
    real English has, as written (the simulator's "english paragraphs" length family)."""
    return tuple(p.strip() for m in CORPUS_MODULES for d in _docstrings(m) for p in d.split("\n\n") if len(p.split()) >= 3)


def paragraph_texts(n: int, max_tokens: int = 256, seed: int = 0, tokenizer: Tokenizer | None = None) -> list[str]:
    """n of the corpus's paragraphs, drawn with replacement (seeded) from those of at most `max_tokens` tokens (special
    tokens counted): short texts of real English lengths, where make_texts spreads lengths uniformly."""
    paragraphs = corpus_paragraphs()
    fit = [p for p, c in zip(paragraphs, count_tokens(paragraphs, tokenizer)) if c <= max_tokens]
    rng = random.Random(f"paragraphs/{seed}")
    return [rng.choice(fit) for _ in range(n)]


@lru_cache(maxsize=1)
def load_tokenizer(folder: str | Path | None = None) -> Tokenizer:
    """The served model's tokenizer (tokenizer.json of `folder`, default the embedded all-MiniLM-L6-v2), no padding
    or truncation."""
    from tokenizers import Tokenizer

    from models.config import default_model_path

    tok = Tokenizer.from_file(str(Path(folder or default_model_path()) / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


def count_tokens(texts: Sequence[str], tokenizer: Tokenizer | None = None) -> list[int]:
    """Token count of each text with special tokens, as the server counts and runs them."""
    tok = tokenizer or load_tokenizer()
    return [len(enc.ids) for enc in tok.encode_batch(list(texts), add_special_tokens=True)]


def _word_costs(words: Sequence[str], tok: Tokenizer) -> list[int]:
    """Tokens each word adds on its own (no special tokens); BERT pre-tokenizes on spaces, so they add up."""
    unique = sorted(set(words))
    counts = dict(zip(unique, (len(e.ids) for e in tok.encode_batch(unique, add_special_tokens=False))))
    return [counts[w] for w in words]


def _special_overhead(tok: Tokenizer) -> int:
    """Tokens the post-processor adds around one sequence ([CLS] and [SEP]: 2)."""
    return len(tok.encode("a", add_special_tokens=True).ids) - len(tok.encode("a", add_special_tokens=False).ids)


def target_lengths(n: int, min_tokens: int = 8, max_tokens: int = 256, seed: int = 0) -> list[int]:
    """n token lengths spread uniformly over [min_tokens, max_tokens], stratified then shuffled.

    Stratification (one draw per 1/n of the range) keeps the mean and spread close to the uniform
    distribution's even for small n; the shuffle makes arrival order random.
    """
    if n < 0 or min_tokens < 1 or max_tokens < min_tokens:
        raise ValueError(f"need n >= 0 and 1 <= min_tokens <= max_tokens (got {n}, {min_tokens}, {max_tokens})")
    rng = random.Random(f"lengths/{seed}")
    span = max_tokens - min_tokens + 1
    lengths = [min_tokens + min(span - 1, int((i + rng.random()) * span / n)) for i in range(n)]
    rng.shuffle(lengths)
    return lengths


def make_texts(n: int, min_tokens: int = 8, max_tokens: int = 256, seed: int = 0,
               tokenizer: Tokenizer | None = None) -> list[str]:
    """Return n English texts whose token counts (with special tokens) are uniform in [min_tokens, max_tokens].

    Each text is a run of consecutive corpus words starting at a seeded random position; words that
    would overshoot the target are skipped, so every count is exact (checked against the tokenizer).
    `tokenizer` is a `tokenizers.Tokenizer`; the default is the served model's (see load_tokenizer).
    min_tokens must leave room for at least one word after the special tokens (>= 3 for BERT).
    """
    tok = tokenizer or load_tokenizer()
    words = corpus_words()
    costs = _word_costs(words, tok)
    special = _special_overhead(tok)
    if min_tokens <= special:
        raise ValueError(f"min_tokens={min_tokens} leaves no room for a word besides {special} special tokens")
    rng = random.Random(f"texts/{seed}")
    texts = []
    for target in target_lengths(n, min_tokens, max_tokens, seed):
        budget = target - special
        i = rng.randrange(len(words))
        picked: list[str] = []
        while budget > 0:
            cost = costs[i]
            if cost <= budget:
                picked.append(words[i])
                budget -= cost
            i = (i + 1) % len(words)
        texts.append(" ".join(picked))
    counts = count_tokens(texts, tok)
    wrong = [(t, c) for t, c in zip(target_lengths(n, min_tokens, max_tokens, seed), counts) if t != c]
    if wrong:  # would mean the tokenizer's counts are not additive over spaces
        raise RuntimeError(f"{len(wrong)} texts missed their token target, e.g. (target, got) {wrong[:3]}")
    return texts
