"""The real entry point: `turboserve` as a user runs it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

BIN = Path(sys.executable).with_name("turboserve")


def run(*args, env=None, timeout=60):
    return subprocess.run([str(BIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help():
    out = run("--help")
    assert out.returncode == 0 and "serve" in out.stdout
    out = run("serve", "--help")
    assert out.returncode == 0 and "--config" in out.stdout and "--model" in out.stdout


@pytest.mark.parametrize("args,env,needle", [
    (["--port", "99999"], {}, "server.port"),
    ([], {"TURBOSERVE_SCHEDULER__MAX_BATCH_TOKENS": "0"}, "scheduler.max_batch_tokens"),
    (["--model", "/nonexistent/model"], {}, "model.path"),
    (["--config", "/nonexistent.yaml"], {}, "cannot read config file"),
])
def test_invalid_settings_fail_at_start_naming_the_field(args, env, needle):
    out = run("serve", *args, env=env)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMALL_PROFILE = {"TURBOSERVE_SCHEDULER__PROFILE_MAX_TOKENS": "128", "TURBOSERVE_SCHEDULER__PROFILE_RUNS": "1"}


@pytest.mark.slow
def test_profile_measures_and_saves_then_serve_loads_it(tmp_path):
    env = {**SMALL_PROFILE, "TURBOSERVE_SCHEDULER__COST_MODEL_DIR": str(tmp_path)}
    out = run("profile", env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "measured ms" in out.stdout and "saved to" in out.stdout
    saved = list(tmp_path.glob("cost-*.json"))
    assert len(saved) == 1
    _serve_and_stop(env, expect_log="cost model loaded")


@pytest.mark.slow
def test_serve_the_embedded_model_and_stop_on_sigterm(tmp_path):
    _serve_and_stop({**SMALL_PROFILE, "TURBOSERVE_SCHEDULER__COST_MODEL_DIR": str(tmp_path)}, expect_log="cost model measured")


def _serve_and_stop(env: dict, expect_log: str):
    port = _free_port()
    proc = subprocess.Popen([str(BIN), "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 120
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            while True:
                try:
                    if c.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not become healthy"
                time.sleep(0.2)
            r = c.post("/embed", json={"inputs": "What is Deep Learning?"})
            assert r.status_code == 200 and len(r.json()[0]) == 384
            assert c.get("/info").json()["model_id"] == "all-MiniLM-L6-v2"
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
        assert proc.wait(30) in (0, -signal.SIGTERM)
        log = proc.stdout.read()
        assert "Application shutdown complete" in log
        assert expect_log in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
