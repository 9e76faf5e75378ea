"""Recommendation serving with Redis and process restarts: updates through a Redis stream visible over HTTP
within a second, a Redis volatile tier that goes away and comes back, and acknowledged updates that survive
kill -9 (the DLRM and helpers of recommend_support.py)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import torch
import yaml

from embeddings.stream_format import publish_update
from server.import_tables import import_table
from tests.processes import free_port
from tests.server.recommend_support import DENSE, SPARSE, embedding_sections, reference_scores, wait_until
from tests.support import dummy_server, spawn_server, wait_healthy


def copy_db(dlrm, dest: Path) -> Path:
    """A private copy of the imported store (a test that writes must not disturb the shared one)."""
    for table, path in dlrm["tables"].items():
        import_table(str(dest), table, str(path), progress=False)
    np.save(dest.parent / "scratch.npy", np.zeros((50, 3), np.float32))
    import_table(str(dest), "scratch", str(dest.parent / "scratch.npy"), progress=False)
    return dest


@pytest.mark.redis
def test_stream_update_is_visible_over_http_within_a_second(dlrm, redis_node, tmp_path):
    sections = embedding_sections(dlrm, path=str(copy_db(dlrm, tmp_path / "db")), update_stream="updates",
                                  update_stream_url=redis_node.url, update_block_ms=50)
    r = redis.Redis(port=redis_node.port)
    with dummy_server(**sections) as s, s.client() as c:
        assert c.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [9]}).json()["vectors"] == [[0, 0, 0]]
        publish_update(r, "updates", "scratch", [9], np.array([[7, 8, 9]], np.float32))
        wait_until(lambda: c.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [9]}).json()["vectors"] == [[7, 8, 9]],
                   what="stream update visible")
        cached, found = s.app.state.recommender.ps.device_cache.lookup("scratch", torch.tensor([9]))
        assert found.item() and cached[0].tolist() == [7, 8, 9]
        assert 'turboserve_embedding_stream_messages_total{outcome="applied"} 1.0' in c.get("/metrics").text
    r.close()


@pytest.mark.redis
def test_redis_volatile_tier_outage_keeps_answering_and_recovers(dlrm, redis_node, tmp_path):
    sections = embedding_sections(dlrm, path=str(copy_db(dlrm, tmp_path / "db")), volatile_backend="redis",
                                  redis_urls=[redis_node.url], redis_timeout_s=0.1, cache_rows=4)
    users = np.load(dlrm["tables"]["users"])
    r = redis.Redis(port=redis_node.port)

    def check(c, keys):
        got = c.post("/v1/embeddings/lookup", json={"table": "users", "keys": keys})
        assert got.status_code == 200
        np.testing.assert_array_equal(np.array(got.json()["vectors"], np.float32), users[keys])
        rec = c.post("/v1/recommend", json={"dense": DENSE, "sparse": SPARSE})
        assert rec.status_code == 200
        np.testing.assert_allclose(rec.json()["scores"], reference_scores(dlrm, DENSE, SPARSE), atol=1e-5, rtol=0)

    with dummy_server(**sections) as s, s.client() as c:
        check(c, [1, 2, 3])
        assert r.dbsize() > 0  # rows went up into Redis
        redis_node.stop()
        for start in range(10, 60, 10):  # fresh keys: the device cache cannot answer them
            check(c, list(range(start, start + 5)))
        assert s.app.state.recommender.ps.stats()["redis"]["errors"] >= 1
        update = c.post("/v1/embeddings/update", json={"table": "scratch", "keys": [3], "vectors": [[3, 3, 3]]})
        assert update.status_code == 200  # RocksDB took it; Redis is only a cache
        assert c.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": [3]}).json()["vectors"] == [[3, 3, 3]]
        redis_node.start()  # same port, empty
        r = redis.Redis(port=redis_node.port)
        fresh = iter(range(100, 200, 3))

        def refilled():
            check(c, [next(fresh)])
            return r.dbsize() > 0

        wait_until(refilled, timeout=15, what="Redis tier used again")
    r.close()


# -- restart durability: the real server, killed with SIGKILL right after acknowledging ------------------
def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


@pytest.mark.redis
@pytest.mark.slow
def test_acknowledged_updates_survive_kill_9(dlrm, redis_node, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db = copy_db(dlrm, tmp_path / "db")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port},
        "model": {"warmup": False},
        "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1, "profile_max_tokens": 16,
                      "max_batch_requests": 2},
        **embedding_sections(dlrm, path=str(db), update_stream="updates", update_stream_url=redis_node.url,
                             update_consumer="replica-1", update_block_ms=100),
    }))
    log = tmp_path / "serve.log"
    r = redis.Redis(port=redis_node.port)
    expected: dict[int, list[float]] = {}

    proc = spawn_server(config, log)
    try:
        wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, timeout=10) as c:  # HTTP: kill right after each 200
            for key in range(3):
                vector = [float(key), 1.5, -2.0]
                resp = c.post("/v1/embeddings/update", json={"table": "scratch", "keys": [key], "vectors": [vector]})
                assert resp.status_code == 200
                expected[key] = vector
                if key == 2:
                    _kill(proc)
        proc = spawn_server(config, log)
        wait_healthy(proc, url, log)
        for key in range(10, 13):  # the stream: kill right after each XACK
            vector = [float(key), 0.5, 0.25]
            entry = publish_update(r, "updates", "scratch", [key], np.array([vector], np.float32))
            expected[key] = vector

            def acked(entry=entry):
                info = r.xpending("updates", "turboserve")
                groups = {g["name"]: g for g in r.xinfo_groups("updates")}
                return info["pending"] == 0 and groups[b"turboserve"]["last-delivered-id"] == entry

            wait_until(acked, timeout=5, what="XACK")
        _kill(proc)
        # an entry published while no server runs is applied after the restart
        publish_update(r, "updates", "scratch", [20], np.array([[20, 20, 20]], np.float32))
        expected[20] = [20.0, 20.0, 20.0]
        proc = spawn_server(config, log)
        wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, timeout=10) as c:
            def all_there():
                got = c.post("/v1/embeddings/lookup", json={"table": "scratch", "keys": list(expected)}).json()
                return got["vectors"] == list(expected.values())

            wait_until(all_there, timeout=5, what="every acknowledged update after restart")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        r.close()
