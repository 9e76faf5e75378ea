"""Fixtures: real redis-server processes on free loopback ports (one node, a 3-node cluster), RocksDB on tmp_path.

The Redis tests fail (never skip) where redis-server is missing: `make test` installs it.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.processes import RedisProcess, free_port


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three redis-server nodes made one cluster with redis-cli --cluster create (no replicas)."""
    import redis  # noqa: PLC0415  (here: the GPU machine collects this folder without redis-py)

    base = tmp_path_factory.mktemp("cluster")
    nodes = []
    try:
        for i in range(3):
            node = RedisProcess(free_port(with_bus=True), base / f"n{i}", cluster=True)
            node.start()
            nodes.append(node)
        created = subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes],
                                  "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, timeout=60, check=False)
        assert created.returncode == 0, created.stdout + created.stderr
        # every node must know every slot's owner before a client may route to it
        clients = [redis.Redis(port=n.port) for n in nodes]
        deadline = time.monotonic() + 30
        while not all(c.cluster("info").get("cluster_state") == "ok" and len(c.cluster("slots")) == 3 for c in clients):
            assert time.monotonic() < deadline, "cluster did not reach state ok on every node"
            time.sleep(0.05)
        for c in clients:
            c.close()
        yield nodes
    finally:
        for node in nodes:
            node.stop()
