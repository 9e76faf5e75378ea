"""Fixtures: real redis-server processes on free loopback ports (one node, a 3-node cluster), RocksDB on tmp_path.

The Redis tests fail (never skip) where redis-server is missing: `make test` installs it.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_bus: bool = False) -> int:
    """A free loopback port (and, for cluster nodes, its bus port + 10000 too)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 50000)
        if _port_free(port) and (not with_bus or _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port found")


class RedisProcess:
    """One redis-server on 127.0.0.1:port, started and stopped by the test (no persistence)."""

    def __init__(self, port: int, workdir: Path, cluster: bool = False) -> None:
        self.port, self.workdir, self.cluster = port, workdir, cluster
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("redis-server")
        assert exe is not None, "redis-server is not installed (make test installs Debian's redis-server)"
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [exe, "--port", str(self.port), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1",
                "--dir", str(self.workdir)]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", str(self.workdir / "nodes.conf")]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.01)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None




@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three redis-server nodes made one cluster with redis-cli --cluster create (no replicas)."""
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
