"""SIGTERM under load: readiness drops at once, new requests get 503, every admitted request completes."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.processes import free_port
from tests.support import spawn_server, wait_healthy

TEXTS = [f"sentence number {i} about draining a server gracefully under load" for i in range(16)]


def _serve(tmp_path: Path, port: int) -> tuple[subprocess.Popen, Path]:
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "shutdown_timeout_s": 20},
        "model": {"warmup": False},
        "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1, "profile_max_tokens": 16},
    }))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    wait_healthy(proc, f"http://127.0.0.1:{port}", log)
    return proc, log


@pytest.mark.slow
def test_sigterm_drains_admitted_requests_and_refuses_new_ones(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc, log = _serve(tmp_path, port)
    results: list[tuple[float, float, object]] = []  # (sent, answered, status or exception)
    stop = threading.Event()
    lock = threading.Lock()

    def client():
        # A fresh connection a request, as many independent clients would; stop once refused (as a load
        # balancer does when readiness drops).
        with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as c:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = c.post("/embed", json={"inputs": TEXTS})
                    outcome = (r.status_code, len(r.json()) if r.status_code == 200 else r.json(), r.headers.get("retry-after"))
                except httpx.ConnectError:
                    outcome = "refused"
                except httpx.TransportError as exc:  # connected, then lost: an admitted request dropped
                    outcome = f"lost: {exc!r}"
                with lock:
                    results.append((sent, time.monotonic(), outcome))
                if outcome == "refused" or (isinstance(outcome, tuple) and outcome[0] == 503):
                    return

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while sum(1 for r in results if r[2][0] == 200) < 6:  # the load is on
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        term_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # Readiness turns false at once, while the process is still up and draining.
        ready = httpx.get(f"{url}/v2/health/ready", timeout=5)
        assert ready.status_code == 503
        assert proc.wait(25) == 0  # exits by itself, within shutdown_timeout_s (+ start-up of the drain)
        exited_at = time.monotonic()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert exited_at - term_at < 21, text[-2000:]
    lost = [r for r in results if isinstance(r[2], str) and r[2].startswith("lost")]
    assert not lost, (lost, term_at, exited_at, text[-3000:])
    before = [r for r in results if r[0] < term_at]
    # Sent before SIGTERM: answered 200 with one vector per input (admitted, even if it ran after SIGTERM),
    # or 503 when it reached the server only after the drain began (refused, never admitted).
    assert before and all((r[2][0] == 200 and r[2][1] == len(TEXTS)) or r[2][0] == 503 for r in before), before
    assert any(r[1] > term_at and r[2][0] == 200 for r in before), "no request was in flight at SIGTERM"
    refused = [r for r in results if isinstance(r[2], tuple) and r[2][0] == 503]
    assert refused and all(r[2][2] for r in refused)  # 503 with Retry-After during the drain
    assert all(r[2][0] in (200, 503) for r in results if isinstance(r[2], tuple))
    assert "draining" in text and "drained in" in text




def _heavy_requests(url: str, n: int) -> tuple[list, list[threading.Thread]]:
    """n requests of 32 long texts each (seconds of work on this CPU), each on its own thread; outcomes land in the list."""
    outcomes: list = []

    def one(i: int):
        try:
            r = httpx.post(f"{url}/embed", json={"inputs": [f"w{i} {j} " * 40 for j in range(32)]}, timeout=60)
            outcomes.append((r.status_code, r.headers.get("content-type"), r.headers.get("x-request-id") is not None,
                             r.json() if r.status_code != 200 else None))
        except httpx.TransportError as exc:
            outcomes.append(f"lost: {exc!r}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return outcomes, threads


def _signal_and_wait(proc: subprocess.Popen, log: Path, signals, status: int, threads) -> tuple[float, str]:
    """Send the signals (0.3 s apart), check the exit status, wait for the clients; (seconds to the exit, the log).
    The server is killed if it is still running after a failed check."""
    try:
        sent = time.monotonic()
        for i, sig in enumerate(signals):
            if i:
                time.sleep(0.3)
            proc.send_signal(sig)
        assert proc.wait(20) == status, log.read_text()[-3000:]
        took = time.monotonic() - sent
        for t in threads:
            t.join(30)
        return took, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
# Each exit within 3 s of the first signal: the queue holds far more (8 requests of seconds each), and one that
# waited for it would answer none 503. (Ctrl-C and a second SIGTERM were held to 2 s: 2.03 s on a loaded 2-vCPU VM.)
@pytest.mark.parametrize("signals,status,within", [((signal.SIGTERM,), 0, 3.0), ((signal.SIGINT,), 130, 3.0),
                                                   ((signal.SIGTERM, signal.SIGTERM), -signal.SIGTERM, 3.0)])
def test_what_cannot_run_before_the_exit_is_answered_503(tmp_path, signals, status, within):
    """Work still queued when the drain deadline passes (shutdown_timeout_s 2 here, 8 requests of several seconds),
    or when Ctrl-C or a second SIGTERM asks for an exit now: answered 503 in the API's shape (it was uvicorn's
    plain-text 500 at the deadline, and a forced exit waited for the queue), the exit on time, no traceback."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": port, "shutdown_timeout_s": 2}, "model": {"warmup": False},
                                      "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1,
                                                    "profile_max_tokens": 16, "max_queue_size": 256}}))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    try:
        wait_healthy(proc, url, log)
        outcomes, threads = _heavy_requests(url, 8)
        time.sleep(0.5)  # admitted and queued
    except BaseException:
        proc.kill()
        raise
    took, text = _signal_and_wait(proc, log, signals, status, threads)
    assert took < within, (took, text[-2000:])
    assert len(outcomes) == 8 and all(isinstance(o, tuple) for o in outcomes), outcomes
    refused = [o for o in outcomes if o[0] == 503]
    assert refused and all(o[0] in (200, 503) for o in outcomes), outcomes
    assert all(o[1] == "application/json" and o[2] and o[3]["error_type"] == "Unhealthy" for o in refused), refused
    assert "Traceback" not in text, text[-3000:]


@pytest.mark.slow
def test_sigterm_answers_an_admitted_grpc_call(tmp_path):
    import numpy as np  # noqa: PLC0415
    import tritonclient.grpc as tgrpc  # noqa: PLC0415

    port, grpc_port = free_port(), free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "grpc_port": grpc_port, "shutdown_timeout_s": 20},
        "model": {"warmup": False},
        # fifo waiting up to 10 s to fill a batch of 64: the call's 16 sequences sit in the queue, where /metrics shows
        # them, when SIGTERM comes; the drain must still run them (a closing queue holds nothing back).
        "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1, "profile_max_tokens": 16,
                      "policy": "fifo", "fixed_batch_size": 64, "max_queue_delay_ms": 10_000},
    }))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, log)
    client = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    text = tgrpc.InferInput("text", [16], "BYTES")
    text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=object))
    outcome: dict = {}

    def grpc_call():
        try:
            outcome["grpc"] = client.infer("all-MiniLM-L6-v2", [text]).as_numpy("embedding").shape
        except Exception as exc:  # noqa: BLE001 - recorded and asserted below
            outcome["grpc"] = repr(exc)

    caller = threading.Thread(target=grpc_call)
    caller.start()
    deadline = time.monotonic() + 20
    while "turboserve_queue_depth 16.0" not in httpx.get(f"{url}/metrics").text:  # admitted, held for a fuller batch
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    caller.join(60)
    assert outcome == {"grpc": (16, 384)}, (outcome, log.read_text()[-2000:])
    assert time.monotonic() - started < 8  # run at the drain, not after the 10 s batching wait
    assert proc.wait(30) == 0
    client.close()


@pytest.mark.slow
def test_a_batch_still_running_at_the_deadline_is_answered_503_and_the_exit_is_on_time(tmp_path):
    """Requests whose batch runs past shutdown_timeout_s: uvicorn cancels them at its deadline; they were its
    plain-text 500 (no request id, no API shape), the exit waited for the batch (~10 s for a 2 s limit), and an exit
    with the batch still running aborted in torch's thread pool. Now: 503 in the API's shape, exit 0, on time."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": port, "shutdown_timeout_s": 1.0, "max_client_batch_size": 128},
                                      "model": {"warmup": False},
                                      "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1,
                                                    "profile_max_tokens": 16, "policy": "token_budget",
                                                    "max_batch_tokens": 32768, "max_batch_requests": 128}}))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    outcomes: list = []

    def one(i: int):
        body = {"inputs": [f"w{i} {j} " * 120 for j in range(128 if i == 0 else 8)], "truncate": True}  # 128 x 256 tokens
        try:
            r = httpx.post(f"{url}/embed", json=body, headers={"x-request-id": f"r{i}"}, timeout=60)
            outcomes.append((r.status_code, r.headers.get("content-type"), r.headers.get("x-request-id"), r.text[:200]))
        except httpx.TransportError as exc:
            outcomes.append(f"lost: {exc!r}")

    try:
        wait_healthy(proc, url, log)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
        threads[0].start()
        time.sleep(1.0)  # the first request, one batch of 32,768 tokens (4 s or more here), is running
        for t in threads[1:]:  # and three small ones wait behind it
            t.start()
        time.sleep(0.2)
    except BaseException:
        proc.kill()
        raise
    took, text = _signal_and_wait(proc, log, (signal.SIGTERM,), 0, threads)
    assert took < 1.0 + 1.5, (took, text[-2000:])
    assert len(outcomes) == 4 and all(isinstance(o, tuple) for o in outcomes), outcomes
    assert all(o[0] in (200, 503) and o[1] == "application/json" and o[2] in ("r0", "r1", "r2", "r3") for o in outcomes), outcomes
    assert "not answered before shutdown: 503" in text, text[-3000:]  # the running batch's request, cancelled by uvicorn
    assert "Traceback" not in text and "terminate called" not in text, text[-3000:]


@pytest.mark.slow
def test_ctrl_c_exits_130_when_started_with_sigint_ignored(tmp_path):
    """A non-interactive shell starts its background jobs (`turboserve serve &`) with SIGINT ignored: uvicorn still
    handles the signal, but its re-raise of it was then a no-op and the exit status 0 (the drain test above failed
    so when its suite ran in the background)."""
    import os  # noqa: PLC0415

    from tests.support import BIN  # noqa: PLC0415

    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": port}, "model": {"warmup": False},
                                      "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1,
                                                    "profile_max_tokens": 16}}))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([str(BIN), "serve", "--config", str(config)], stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", log)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 130, log.read_text()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
