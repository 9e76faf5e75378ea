"""Access log and JSON log lines: the real `turboserve serve` writes one JSON object per line, and each
request's access line carries the request id the response header returned."""

from __future__ import annotations

import json
import logging
import signal
from datetime import datetime

import httpx
import pytest
import yaml

from models.config import default_model_path
from server.logs import ACCESS_FIELDS, ACCESS_LOGGER, JsonFormatter, TextFormatter
from tests.processes import free_port
from tests.support import dummy_server, spawn_server, wait_healthy

KEY = "access-log-key"


class Lines(logging.Handler):
    """Formats each record when it is emitted (in the emitting task's context, as the stderr handler does)."""

    def __init__(self, formatter: logging.Formatter):
        super().__init__(logging.DEBUG)
        self.setFormatter(formatter)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def capture():
    """Attach a formatting handler to a logger for one test; yields a factory."""
    attached: list[tuple[logging.Logger, Lines, int]] = []

    def attach(name: str, formatter: logging.Formatter) -> Lines:
        logger = logging.getLogger(name)
        handler = Lines(formatter)
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        return handler

    yield attach
    for logger, handler, level in attached:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow
def test_real_server_json_logs_carry_the_response_request_id(tmp_path):
    # The model folder lives under server.model_dirs (its files link to the embedded model's).
    models = tmp_path / "models"
    folder = models / "mini"
    folder.mkdir(parents=True)
    for entry in default_model_path().iterdir():
        (folder / entry.name).symlink_to(entry)
    (tmp_path / "key").write_text(KEY + "\n")
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"port": port, "log_format": "json", "access_log": True, "api_key_file": str(tmp_path / "key"),
                   "model_dirs": [str(models)]},
        "model": {"path": str(folder), "warmup": False},
        "scheduler": {"cost_model_dir": str(tmp_path / "cost"), "profile_runs": 1, "profile_max_tokens": 16},
    }))
    log = tmp_path / "serve.log"
    proc = spawn_server(config, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, log)
        with httpx.Client(base_url=url, timeout=30) as c:
            ok = c.post("/embed", json={"inputs": ["access log line"]},
                        headers={"authorization": f"Bearer {KEY}", "x-request-id": "trace-abc", "user-agent": "ua/1 test"})
            refused = c.post("/v1/embeddings", json={"input": "x", "model": "mini"})
            weird = c.get("/no%0Asuch", headers={"authorization": f"Bearer {KEY}"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "trace-abc"
        assert refused.status_code == 401 and weird.status_code == 404
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    lines = [line for line in log.read_text().splitlines() if line.strip()]
    records = []
    for line in lines:  # every line the server wrote, uvicorn's included, is one JSON object
        record = json.loads(line)
        assert {"time", "level", "logger", "message"} <= record.keys(), line
        datetime.fromisoformat(record["time"])
        records.append(record)
    loggers = {r["logger"] for r in records}
    assert {"uvicorn.error", "server.app", ACCESS_LOGGER} <= loggers, loggers
    assert any(r["logger"] == "server.app" and "ready" in r["message"] for r in records)
    assert any("Application shutdown complete" in r["message"] for r in records)

    access = {r["request_id"]: r for r in records if r["logger"] == ACCESS_LOGGER}
    line = access["trace-abc"]
    assert set(ACCESS_FIELDS) <= line.keys()
    assert (line["method"], line["path"], line["route"], line["status"]) == ("POST", "/embed", "/embed", 200)
    assert line["bytes_out"] == len(ok.content) and line["user_agent"] == "ua/1 test"
    assert line["client"].startswith("127.0.0.1:") and line["level"] == "info"
    assert line["tokens"] == int(ok.headers["x-compute-tokens"]) > 0
    assert line["inference_ms"] > 0 and line["duration_ms"] >= float(ok.headers["x-total-time"])
    # A refused request is logged under the id its response header carried (a fresh one here).
    line = access[refused.headers["x-request-id"]]
    assert (line["status"], line["route"], line["tokens"]) == (401, None, 0)
    assert access[weird.headers["x-request-id"]]["path"] == "/no\nsuch"  # escaped inside the JSON string
    # The health polls are logged too; uvicorn's own access line is not.
    assert any(r["path"] == "/health" for r in access.values())
    assert "uvicorn.access" not in loggers


def test_access_log_is_off_by_default(capture):
    lines = capture(ACCESS_LOGGER, JsonFormatter())
    with dummy_server() as s, s.client() as c:
        assert c.post("/embed", json={"inputs": "x"}).status_code == 200
    assert lines.lines == []


def test_text_access_line_is_one_line_even_for_a_hostile_path(capture):
    lines = capture(ACCESS_LOGGER, TextFormatter())
    with dummy_server(server={"access_log": True}) as s, s.client() as c:
        r = c.get("/x%0Aforged%20INFO%20line", headers={"x-request-id": "rid-text"})
        assert r.status_code == 404
        r = c.post("/embed", json={"inputs": "x"}, headers={"x-request-id": "rid-ok"})
        assert r.status_code == 200
    (forged,) = [line for line in lines.lines if "request_id=rid-text" in line]
    assert "\n" not in forged and '"/x\\nforged INFO line"' in forged and " status=404 " in forged
    (ok,) = [line for line in lines.lines if "request_id=rid-ok" in line]
    assert " INFO turboserve.access: POST /embed 200 " in ok and " route=/embed " in ok and " tokens=3 " in ok


def test_app_log_lines_during_a_request_carry_its_id(capture, monkeypatch):
    lines = capture("server.middleware", JsonFormatter())
    with dummy_server() as s, s.client() as c:
        def explode(*args, **kwargs):
            raise RuntimeError("secret internal detail")

        monkeypatch.setattr(s.app.state.engine.tokenizer, "encode", explode)
        r = c.post("/embed", json={"inputs": "x"}, headers={"x-request-id": "rid-500"})
        assert r.status_code == 500 and "secret internal detail" not in r.text
    (line,) = [json.loads(line) for line in lines.lines]
    assert line["request_id"] == "rid-500" and line["level"] == "error"
    assert "RuntimeError: secret internal detail" in line["exc_info"]  # the traceback goes to the log only


def test_a_huge_user_agent_and_a_forging_request_id_stay_bounded_and_on_one_line(capture):
    """A 1 MiB User-Agent made a 1 MiB access line; a request id with U+0085 went raw into the engine's timeout
    message (a forged line in a text log)."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from tests.support import DummyEmbedder  # noqa: PLC0415

    access = capture(ACCESS_LOGGER, JsonFormatter())
    engine = capture("server.engine", TextFormatter())
    embedder = DummyEmbedder()
    with dummy_server(embedder, server={"access_log": True}) as s, ThreadPoolExecutor(2) as pool, s.client() as c:
        c.post("/embed", json={"inputs": "x"}, headers={"user-agent": "a" * 1_000_000})
        blocker = embedder.occupy(pool, c)
        r = c.post("/embed", json={"inputs": "late"}, headers={"x-request-id": b"rid\x85 ERROR forged: FAKE",
                                                                "x-request-timeout-ms": "100"})
        assert r.status_code == 504
        embedder.gate.set()
        blocker.result(10)
    assert access.lines and all(len(line) < 4000 for line in access.lines), max(map(len, access.lines))
    timed_out = [line for line in engine.lines if "no answer within" in line]
    assert timed_out and all("\x85" not in line for line in timed_out), timed_out
