"""bench/workload.py: the benchmarks' texts, made without any download from standard-library docstrings."""

from bench.workload import corpus_paragraphs, count_tokens, make_texts, paragraph_texts


def test_make_texts_hits_every_token_target_and_is_reproducible():
    texts = make_texts(40, 8, 64, seed=4)
    lengths = count_tokens(texts)
    assert min(lengths) >= 8 and max(lengths) <= 64 and len(set(lengths)) > 20
    assert make_texts(40, 8, 64, seed=4) == texts != make_texts(40, 8, 64, seed=5)


def test_paragraph_texts_are_the_corpus_paragraphs_within_the_token_limit():
    """Real paragraphs as written (what --texts english serves live), drawn reproducibly, none over the limit: mostly
    short, as the simulator's English length family is."""
    texts = paragraph_texts(300, max_tokens=128, seed=3)
    assert paragraph_texts(300, max_tokens=128, seed=3) == texts != paragraph_texts(300, max_tokens=128, seed=4)
    assert set(texts) <= set(corpus_paragraphs())
    lengths = count_tokens(texts)
    assert max(lengths) <= 128 and sorted(lengths)[150] < 64  # a median of short texts
    assert len(set(texts)) > 200  # drawn from thousands
