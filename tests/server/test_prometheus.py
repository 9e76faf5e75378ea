"""Monitoring with real parts: Debian's prometheus scrapes a real turboserve (the embedded encoder and a tiny
DLRM over the embedding parameter server) under light load, and every PromQL expression of the shipped
Grafana dashboard must return data through Prometheus's HTTP API."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from models.dlrm import save_dlrm, save_random_tables
from server.app import create_app
from server.import_tables import import_table
from tests.processes import free_port
from tests.server.recommend_support import CONFIG, DENSE, NAME, SPARSE
from tests.support import ServerThread, settings

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "turboserve.json"
SCRAPE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
# Grafana's global variables, as Grafana would fill them for a 1 s scrape interval.
GRAFANA_VARS = {"$__rate_interval": "15s", "$__interval": "5s", "$__range": "1m"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def dashboard_exprs() -> list[str]:
    """Every target's PromQL in the dashboard, Grafana's variables substituted."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    out = []
    for e in exprs:
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        assert "$" not in e, f"unsubstituted variable in {e!r}"
        out.append(e)
    return out


def test_dashboard_is_grafana_shaped():
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 39
    assert [v["name"] for v in board["templating"]["list"]] == ["DS_PROMETHEUS"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}" and p["targets"], p["title"]
    assert len(dashboard_exprs()) >= 20


def test_shipped_scrape_config_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("Debian's prometheus (promtool) is not installed (`make prometheus` installs it)")
    r = subprocess.run([promtool, "check", "config", str(SCRAPE_CONFIG)], check=False, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


class Prometheus:
    """Debian's prometheus on 127.0.0.1:port with its TSDB in `workdir`, scraping `target` every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        exe = shutil.which("prometheus")
        if exe is None:
            pytest.skip("Debian's prometheus is not installed (`make prometheus` installs it)")
        config = yaml.safe_load(SCRAPE_CONFIG.read_text())  # the shipped config, interval and target swapped
        job = config["scrape_configs"][0]
        assert job["job_name"] == "turboserve" and job["metrics_path"] == "/metrics"
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [exe, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=5)

    def query(self, expr: str) -> list[dict]:
        r = self.http.get("/api/v1/query", params={"query": expr})
        assert r.status_code == 200, f"{expr}: {r.text}"
        return r.json()["data"]["result"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited with {self.proc.returncode}"
            try:
                if self.http.get("/-/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.1)

    def close(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The embedded encoder (small cost-model grid, so it starts in seconds) beside a tiny DLRM."""
    base = tmp_path_factory.mktemp("prom-dlrm")
    folder = save_dlrm(base / NAME, CONFIG, seed=0)
    for table, path in save_random_tables(base / "tables", CONFIG, seed=1).items():
        import_table(str(base / "db"), table, str(path), progress=False)
    app = create_app(settings(
        model={"warmup": False}, scheduler={"profile_max_tokens": 16, "max_batch_requests": 4},
        embeddings={"enabled": True, "path": str(base / "db"), "cache_rows": 32, "cache_ways": 4, "cache_device": "cpu",
                    "max_keys": 64},
        recommend={"model_path": str(folder), "max_batch": 8}))
    with ServerThread(app) as s:
        yield s


def load(url: str, stop: threading.Event) -> list[int]:
    """Requests over the API families, some of them client errors, until `stop`; the statuses seen."""
    calls = [
        ("/embed", {"inputs": ["the quick brown fox", "jumps over the lazy dog"]}),
        ("/v1/embeddings", {"input": ["hello world"], "model": None}),
        ("/v1/recommend", {"dense": DENSE, "sparse": SPARSE}),
        ("/v1/embeddings/lookup", {"table": "users", "keys": [0, 17, 199]}),
        ("/embed", {"inputs": []}),  # 4xx
        ("/v1/recommend", {"dense": DENSE}),  # 4xx
    ]
    statuses = []
    with httpx.Client(base_url=url, timeout=10) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        calls[1][1]["model"] = model
        while not stop.is_set():
            for path, body in calls:
                statuses.append(c.post(path, json=body).status_code)
            stop.wait(0.05)
    return statuses


# Queries as dashboards written for TEI make them: TEI's metric names (server/metrics_tei.py), its counters without
# the _total suffix, its histograms' buckets.
TEI_EXPRS = [
    "sum(rate(te_request_count[15s]))",
    'sum(rate(te_request_success{method="batch"}[15s]))',
    "histogram_quantile(0.9, sum by (le) (rate(te_request_duration_bucket[15s])))",
    "histogram_quantile(0.5, sum by (le) (rate(te_request_queue_duration_bucket[15s])))",
    "histogram_quantile(0.5, sum by (le) (rate(te_batch_next_size_bucket[15s])))",
    "sum(rate(te_batch_next_tokens_sum[15s]))",
    "sum(rate(te_request_input_length_count[15s]))",
    "te_queue_size",
]


def test_every_dashboard_expression_returns_data(server, tmp_path):
    started = time.monotonic()
    exprs = dashboard_exprs() + TEI_EXPRS
    prom = Prometheus(server.url.removeprefix("http://"), tmp_path)
    stop = threading.Event()
    statuses: list[int] = []
    loader = threading.Thread(target=lambda: statuses.extend(load(server.url, stop)), daemon=True)
    try:
        prom.wait_ready(timeout=15)
        loader.start()
        # Rates need two samples of every series, the late ones (first 4xx) included: wait for a few scrapes.
        deadline = time.monotonic() + 30
        while not prom.query('count_over_time(up{job="turboserve"}[1m]) >= 5 and up{job="turboserve"} == 1'):
            assert time.monotonic() < deadline, f"prometheus did not scrape turboserve: {prom.query('up')}"
            time.sleep(0.2)
        pending = dict.fromkeys(exprs)
        while pending:
            for expr in list(pending):
                result = prom.query(expr)
                pending[expr] = result
                # Data: a series with a number (a histogram_quantile over no observations is NaN).
                if any(math.isfinite(float(s["value"][1])) for s in result):
                    del pending[expr]
            if pending:
                assert time.monotonic() < deadline, f"no data: {json.dumps(pending, indent=1)}"
                time.sleep(0.5)
        hit_rate = next(e for e in exprs if "cache_hits_total" in e)
        assert {s["metric"]["tier"] for s in prom.query(hit_rate)} == {"device", "volatile", "persistent"}
    finally:
        stop.set()
        if loader.is_alive():
            loader.join(timeout=15)
        prom.close()
    assert 200 in statuses and any(400 <= s < 500 for s in statuses), statuses
    assert time.monotonic() - started < 60
