"""TEI routes against the dummy engine: shapes, normalisation, truncation, info, health."""

from __future__ import annotations

import numpy as np

from tests.support import expected_vector


def _ids(srv, text: str, truncate=False, direction="right") -> list[int]:
    return srv.app.state.engine.tokenizer.encode([text], truncate, direction)[0].ids


def test_embed_single_string_is_normalised_by_default(srv, client):
    r = client.post("/embed", json={"inputs": "hello world"})
    assert r.status_code == 200
    got = np.array(r.json())
    want = expected_vector(_ids(srv, "hello world"))
    assert got.shape == (1, 8)
    np.testing.assert_allclose(got[0], want / np.linalg.norm(want), rtol=1e-5)


def test_embed_batch_keeps_order_and_normalize_false(srv, client):
    texts = ["one", "two words here", "a somewhat longer third input sentence"]
    r = client.post("/embed", json={"inputs": texts, "normalize": False})
    assert r.status_code == 200
    got = np.array(r.json())
    for row, text in zip(got, texts):
        np.testing.assert_allclose(row, expected_vector(_ids(srv, text)), rtol=1e-5)


def test_truncation_directions_keep_the_right_end(srv, client):
    long_text = " ".join(f"w{i}" for i in range(200))
    refused = client.post("/embed", json={"inputs": long_text})
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "Validation"
    for direction in ("right", "Left"):
        r = client.post("/embed", json={"inputs": long_text, "truncate": True, "truncation_direction": direction,
                                        "normalize": False})
        assert r.status_code == 200, r.text
        ids = _ids(srv, long_text, True, direction.lower())
        assert len(ids) == 32
        np.testing.assert_allclose(r.json()[0], expected_vector(ids), rtol=1e-5)
        assert int(r.headers["x-compute-tokens"]) == 32
    right, left = _ids(srv, long_text, True, "right"), _ids(srv, long_text, True, "left")
    assert right != left


def test_token_id_inputs(client):
    r = client.post("/embed", json={"inputs": [[101, 7592, 102], [101, 2088, 102]], "normalize": False})
    assert r.status_code == 200
    np.testing.assert_allclose(r.json()[1], expected_vector([101, 2088, 102]), rtol=1e-5)


def test_info_and_health(client):
    info = client.get("/info").json()
    assert info["model_id"] == "dummy"
    assert info["max_input_length"] == 32
    assert info["model_type"] == {"embedding": {"pooling": "mean"}}
    assert info["max_client_batch_size"] == 32
    health = client.get("/health")
    assert health.status_code == 200


def test_dimensions_on_tei(client):
    r = client.post("/embed", json={"inputs": "abc", "dimensions": 4})
    assert r.status_code == 200
    row = np.array(r.json()[0])
    assert row.shape == (4,) and abs(np.linalg.norm(row) - 1) < 1e-6
