"""Response bodies written by orjson: float32 embeddings read back bit for bit, any array layout, valid JSON."""

import json

import numpy as np

from server.jsonout import dumps


def test_float32_rows_read_back_exactly_and_shorter_than_float64_digits():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((3, 384)).astype(np.float32)
    body = dumps({"data": list(v)})
    back = np.asarray(json.loads(body)["data"], dtype=np.float32)
    assert np.array_equal(back, v)
    assert len(body) < len(json.dumps(v.tolist()))


def test_views_scalars_and_bools_are_written_like_lists():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    doc = {"cols": a[:, ::2], "fortran": np.asfortranarray(a), "scalar": np.float32(0.5), "found": np.array([True, False])}
    assert json.loads(dumps(doc)) == {"cols": a[:, ::2].tolist(), "fortran": a.tolist(), "scalar": 0.5,
                                      "found": [True, False]}


def test_non_finite_values_become_null_not_invalid_json():
    body = dumps(np.array([1.0, np.nan, np.inf], dtype=np.float32))
    assert json.loads(body) == [1.0, None, None]  # json.dumps would write NaN / Infinity, which no strict parser takes
