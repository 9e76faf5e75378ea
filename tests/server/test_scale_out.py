"""Two replicas behind Debian's nginx (deploy/nginx/turboserve.conf); one gets SIGTERM mid-load."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.processes import free_port
from tests.support import spawn_server, stop_load_and_processes

SITE = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "turboserve.conf"
TEXTS = [f"replica test sentence {i}, long enough to take a little while" for i in range(8)]


def _replica(tmp_path: Path, name: str, port: int) -> subprocess.Popen:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "shutdown_timeout_s": 20},
        "model": {"warmup": False},
        "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1, "profile_max_tokens": 16},
    }))
    return spawn_server(config, tmp_path / f"{name}.log")


def _nginx(tmp_path: Path, listen: int, upstreams: list[int]) -> subprocess.Popen:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(exe).exists(), "nginx is not installed (make test installs Debian's nginx-light)"
    site = SITE.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{listen}")
    site = site.replace("127.0.0.1:8001", f"127.0.0.1:{upstreams[0]}").replace("127.0.0.1:8002", f"127.0.0.1:{upstreams[1]}")
    (tmp_path / "site.conf").write_text(site)
    temp = tmp_path / "nginx-temp"
    temp.mkdir()
    (tmp_path / "nginx.conf").write_text(f"""
daemon off;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {tmp_path}/site.conf;
}}
""")
    return subprocess.Popen([exe, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "nginx.out", "w"))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_a_replica_restart_behind_nginx_fails_no_request(tmp_path):
    ports = [free_port(), free_port()]
    front = free_port()
    replicas = [_replica(tmp_path, f"replica{i}", p) for i, p in enumerate(ports)]
    proxy = None
    outcomes: list[tuple[float, object, str | None]] = []
    stop, lock = threading.Event(), threading.Lock()

    def client():
        with httpx.Client(base_url=f"http://127.0.0.1:{front}", timeout=60) as c:
            while not stop.is_set():
                request_id = None
                try:
                    r = c.post("/embed", json={"inputs": TEXTS})
                    outcome = r.status_code if r.status_code != 200 or len(r.json()) == len(TEXTS) else "short"
                    request_id = r.headers.get("x-request-id")
                except httpx.TransportError as exc:
                    outcome = repr(exc)
                with lock:
                    outcomes.append((time.monotonic(), outcome, request_id))

    threads = [threading.Thread(target=client) for _ in range(4)]
    try:
        deadline = time.monotonic() + 240
        while not all(_healthy(f"http://127.0.0.1:{p}") for p in ports):
            assert time.monotonic() < deadline and all(p.poll() is None for p in replicas), \
                (tmp_path / "replica0.log").read_text()[-2000:]
            time.sleep(0.2)
        proxy = _nginx(tmp_path, front, ports)
        while not _healthy(f"http://127.0.0.1:{front}"):
            assert time.monotonic() < deadline and proxy.poll() is None, (tmp_path / "nginx.out").read_text()
            time.sleep(0.1)
        for t in threads:
            t.start()
        while len(outcomes) < 8:  # load is flowing through both replicas
            assert time.monotonic() < deadline
            time.sleep(0.05)
        term_at = time.monotonic()
        replicas[0].send_signal(signal.SIGTERM)
        assert replicas[0].wait(25) == 0
        exited_at = time.monotonic()
        while sum(1 for t, *_ in outcomes if t > exited_at) < 8:  # and goes on through the other one
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop_load_and_processes(stop, threads, [*replicas, proxy])
    failures = [o for o in outcomes if o[1] != 200]
    assert not failures, failures
    during = [o for o in outcomes if term_at < o[0] < exited_at]
    after = [o for o in outcomes if o[0] > exited_at]
    assert after and len(outcomes) >= 16, (len(during), len(after))
    assert "drained in" in (tmp_path / "replica0.log").read_text()
