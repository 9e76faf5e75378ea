"""What is checked at start about where the update stream lives and whether a shared Redis tier sees every update:
a stream on a Redis Cluster is refused by `turboserve serve` (one line, exit 2), a Redis tier without a published
update stream is warned about."""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
import yaml

from configs.settings import Settings
from server.recommend import build_recommender, check_update_stream, shared_without_updates
from tests.support import BIN

pytestmark = pytest.mark.redis


def serve(tmp_path, **embeddings) -> subprocess.CompletedProcess:
    """`turboserve serve` with these embedding settings (a refusal exits before anything loads)."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": 0}, "embeddings": {
        "enabled": True, "path": str(tmp_path / "db"), "cache_rows": 32, "cache_ways": 4, "cache_device": "cpu", **embeddings}}))
    return subprocess.run([str(BIN), "serve", "--config", str(config)], check=False, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_an_update_stream_on_a_redis_cluster_is_refused_at_start(tmp_path, redis_cluster):
    urls = [n.url for n in redis_cluster]
    on_the_tier = serve(tmp_path, volatile_backend="redis_cluster", redis_urls=urls, update_stream="updates")
    at_a_node = serve(tmp_path, update_stream="updates", update_stream_url=urls[1])
    for out in (on_the_tier, at_a_node):
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith("turboserve: embeddings.update_stream='updates'")
        assert "point embeddings.update_stream_url at a standalone Redis" in out.stderr
    assert "volatile_backend='redis_cluster'" in on_the_tier.stderr
    assert f"the Redis at {urls[1]} is a Redis Cluster node" in at_a_node.stderr


def test_a_standalone_or_unreachable_stream_redis_passes(redis_node, redis_cluster):
    urls = [n.url for n in redis_cluster]
    for url in (redis_node.url, "redis://127.0.0.1:1"):  # unreachable: the consumer waits for it, as in an outage
        check_update_stream(Settings(embeddings={"update_stream": "u", "update_stream_url": url,
                                                 "volatile_backend": "redis_cluster", "redis_urls": urls}).embeddings)
    check_update_stream(Settings(embeddings={"update_stream": "u", "redis_urls": [redis_node.url]}).embeddings)
    check_update_stream(Settings(embeddings={"volatile_backend": "redis_cluster", "redis_urls": urls}).embeddings)


def test_a_redis_tier_without_a_published_update_stream_is_warned_about(tmp_path, redis_node, caplog):
    def emb(**kw):
        return Settings(embeddings={"enabled": True, "path": str(tmp_path / "db"), "cache_rows": 32, "cache_ways": 4,
                                    "cache_device": "cpu", "volatile_backend": "redis",
                                    "redis_urls": [redis_node.url], **kw}).embeddings

    assert "no embeddings.update_stream" in shared_without_updates(emb())
    assert "update_publish is false" in shared_without_updates(emb(update_stream="u", update_publish=False))
    assert shared_without_updates(emb(update_stream="u")) is None
    assert shared_without_updates(emb(volatile_backend="memory")) is None
    with caplog.at_level(logging.WARNING, logger="server.recommend"):
        build_recommender(Settings(embeddings=emb().model_dump())).close()
    assert any("if other replicas share that Redis, an update taken over HTTP here is not applied by them" in r.message
               for r in caplog.records)
