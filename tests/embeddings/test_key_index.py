"""KeyIndex, the volatile tier's vectorised hash map: the same answers as a dict under any sequence of operations."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from embeddings.key_index import EMPTY, MAX_LOAD, KeyIndex

KEYS = st.one_of(st.integers(-3, 3), st.integers(-(2**63), 2**63 - 1))  # a few colliding small keys, and any int64
OPS = st.lists(st.tuples(st.sampled_from(["put", "delete"]), st.integers(0, 2), st.lists(KEYS, max_size=40)), max_size=30)


def arrays(table, keys):
    return np.full(len(keys), table, dtype=np.int32), np.array(keys, dtype=np.int64)


@settings(max_examples=150, deadline=None)
@given(OPS, st.lists(st.tuples(st.integers(0, 2), KEYS), max_size=60))
def test_answers_as_a_dict_does(ops, probes):
    index, model, counter = KeyIndex(capacity=4), {}, 0
    for op, table, keys in ops:
        if op == "put":
            new = list(dict.fromkeys(k for k in keys if (table, k) not in model))  # put takes absent, distinct pairs
            vals = np.arange(counter, counter + len(new), dtype=np.int64)
            counter += len(new)
            index.put(*arrays(table, new), vals)
            model.update({(table, k): int(v) for k, v in zip(new, vals)})
        else:
            held = {k for k in keys if (table, k) in model}
            assert index.delete(*arrays(table, keys)) == len(held)
            for k in held:
                del model[(table, k)]
        assert len(index) == len(model) and index.used <= MAX_LOAD * index.size
    for table in range(3):
        keys, vals = index.items(table)
        assert dict(zip(keys.tolist(), vals.tolist())) == {k: v for (t, k), v in model.items() if t == table}
    if probes:
        tables = np.array([t for t, _ in probes], dtype=np.int32)
        keys = np.array([k for _, k in probes], dtype=np.int64)
        assert index.get(tables, keys).tolist() == [model.get(p, -1) for p in probes]


def test_grows_and_purges_deleted_positions():
    index = KeyIndex(capacity=8)
    small = index.size
    tables, keys = arrays(1, list(range(10_000)))
    index.put(tables, keys, keys * 2)
    assert index.size > small and index.get(tables, keys).tolist() == (keys * 2).tolist()
    size = index.size
    for start in range(0, 10_000, 1000):  # delete and re-add: the GONE positions are purged, the size stays
        assert index.delete(tables[start:start + 1000], keys[start:start + 1000]) == 1000
        index.put(tables[start:start + 1000], keys[start:start + 1000], keys[start:start + 1000])
    assert index.size == size and len(index) == 10_000 and index.used <= MAX_LOAD * size
    assert index.get(tables, keys).tolist() == keys.tolist()
    assert index.get(*arrays(0, [5]))[0] == -1  # same key, another table
    assert (index.vals == EMPTY).sum() >= size * (1 - MAX_LOAD)
