"""Fuzz every route against the server's own /openapi.json (issue 7): schemathesis generates valid and
invalid requests per operation; each answer must be no 5xx, a status the schema documents, and a body that
matches the documented schema for that status.

    .venv/bin/python bench/fuzz.py --examples 400        # ~10k requests over 26 operations

The server is spawned as a subprocess: the DummyEmbedder engine of tests/support.py (real tokenizer, fast
deterministic vectors) with the parameter server and a tiny DLRM enabled, so /v1/recommend,
/v1/embeddings/lookup|update and the DLRM's KServe routes are fuzzed too.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DLRM_NAME = "ctr"


def build_recommendation(base: Path) -> dict:
    """A tiny DLRM folder and its tables imported into RocksDB under `base`; the settings sections that serve them."""
    from models.dlrm import DLRMConfig, SparseFeature, save_dlrm, save_random_tables
    from server.import_tables import import_table

    config = DLRMConfig(num_dense=3, bottom_mlp=(8, 4), top_mlp=(8, 1), embedding_dim=4,
                        sparse_features=(SparseFeature("user", "users", 200), SparseFeature("item", "items", 100)))
    folder = save_dlrm(base / DLRM_NAME, config, seed=0)
    db = base / "db"
    for table, path in save_random_tables(base / "tables", config, seed=1).items():
        import_table(str(db), table, str(path), progress=False)
    np.save(base / "scratch.npy", np.zeros((50, 3), np.float32))
    import_table(str(db), "scratch", str(base / "scratch.npy"), progress=False)
    return {"embeddings": {"enabled": True, "path": str(db), "cache_rows": 32, "cache_ways": 4, "cache_device": "cpu",
                           "max_keys": 64},
            "recommend": {"model_path": str(folder), "max_batch": 8}}


def checks() -> list:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def _short(exc: BaseException) -> str:
    """A check failure in one line: its title, and the first lines of its message."""
    title = getattr(exc, "title", type(exc).__name__)
    text = " | ".join(line.strip() for line in str(getattr(exc, "message", exc)).splitlines() if line.strip())
    return f"{title}: {text[:600]}"


def fuzz(base_url: str, max_examples: int, seed: int | None = 0,
         on_result: Callable[[str, int, str | None], None] | None = None) -> list[str]:
    """Run `max_examples` positive and as many negative cases per operation of base_url's /openapi.json.
    Calls on_result(operation, status, failure or None) per request; returns the failure messages (deduplicated)."""
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode
    from schemathesis.core.failures import FailureGroup

    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    session = requests.Session()
    encoder = session.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]

    def steer(pair):
        """Random names almost always miss (404): name the served models and a real table in 3 cases of 4, so
        the success paths are fuzzed too."""
        case, pick = pair
        if pick:
            model = encoder if pick < 3 or "recommend" in case.operation.path else DLRM_NAME
            if "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = model
            if isinstance(case.body, dict):
                if "model" in case.body:
                    case.body["model"] = DLRM_NAME if "recommend" in case.operation.path else encoder
                if "table" in case.body:
                    case.body["table"] = ("users", "items", "scratch")[pick - 1]
        return case

    active = checks()
    failures: dict[str, None] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=st.tuples(operation.as_strategy(generation_mode=mode), st.integers(0, 3)).map(steer))
            @settings(max_examples=max_examples, deadline=None, database=None, derandomize=seed is not None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            def one(case):  # run at once below, so the loop variables it reads are this iteration's
                response = case.call(base_url=base_url, session=session, timeout=30)
                message = None
                try:
                    case.validate_response(response, checks=active)
                except (AssertionError, FailureGroup) as exc:  # one check's failure, or several
                    parts = exc.exceptions if isinstance(exc, FailureGroup) else [exc]
                    message = f"{label} [{mode.value}] " + "; ".join(_short(e) for e in parts)  # noqa: B023
                    failures.setdefault(message)
                if on_result is not None:
                    on_result(label, response.status_code, message)  # noqa: B023

            try:
                one()
            except hypothesis.errors.Unsatisfiable:
                pass
    return list(failures)


def serve(base: Path) -> None:
    """--serve: run the dummy-engine server and print its URL on stdout, until killed."""
    from tests.support import dummy_server

    with dummy_server(**build_recommendation(base)) as srv:
        print(srv.url, flush=True)
        while True:
            time.sleep(3600)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=400, help="max examples per operation and mode (positive, negative)")
    p.add_argument("--url", help="fuzz a running server instead of spawning one")
    p.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the counts and failures here")
    args = p.parse_args()
    if args.serve:
        serve(Path(args.serve))
        return

    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url
        if url is None:
            env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
            proc = subprocess.Popen([sys.executable, __file__, "--serve", tmp], stdout=subprocess.PIPE, cwd=REPO_ROOT,
                                    env=env, text=True)
            url = proc.stdout.readline().strip()
            if not url.startswith("http"):
                sys.exit("the spawned server did not start")
        try:
            by_status: collections.Counter = collections.Counter()
            by_operation: collections.Counter = collections.Counter()
            failed_requests = 0
            started = time.perf_counter()

            def count(label, status, failure):
                nonlocal failed_requests
                by_status[status] += 1
                by_operation[label] += 1
                failed_requests += failure is not None

            failures = fuzz(url, args.examples, on_result=count)
            elapsed = time.perf_counter() - started
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
    total = sum(by_status.values())
    server_errors = sum(n for s, n in by_status.items() if s >= 500)
    print(f"{total} requests over {len(by_operation)} operations in {elapsed:.0f} s")
    print("by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    print(f"5xx: {server_errors}; requests failing a check: {failed_requests}; distinct failures: {len(failures)}")
    for message in failures:
        print("FAIL", message)
    if args.json:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, check=False,
                                text=True).stdout.strip()
        Path(args.json).write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "commit": commit, "examples": args.examples, "requests": total,
            "seconds": elapsed, "by_status": {str(k): v for k, v in sorted(by_status.items())},
            "by_operation": dict(by_operation), "server_errors": server_errors, "failed_requests": failed_requests,
            "failures": failures}, indent=2))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
