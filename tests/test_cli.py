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
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from embeddings.persistent import PersistentTier
from server.cli import main

BIN = Path(sys.executable).with_name("turboserve")


def run(*args, env=None, timeout=60):
    return subprocess.run([str(BIN), *args], check=False, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_help():
    out = run("--help")
    assert out.returncode == 0 and "serve" in out.stdout
    out = run("serve", "--help")
    assert out.returncode == 0 and "--config" in out.stdout and "--model" in out.stdout
    for flag in ("--api-key-file", "--log-format", "--access-log", "--dtype", "--reranker"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize("args,env,needle", [
    (["--port", "99999"], {}, "server.port"),
    ([], {"TURBOSERVE_SCHEDULER__MAX_BATCH_TOKENS": "0"}, "scheduler.max_batch_tokens"),
    (["--model", "/nonexistent/model"], {}, "model.path"),
    (["--config", "/nonexistent.yaml"], {}, "cannot read config file"),
    ([], {"TURBOSERVE_SERVER__LOG_FORMAT": "xml"}, "server.log_format"),
    (["--api-key-file", "/nonexistent/key"], {}, "cannot read server.api_key_file"),
    (["--dtype", "float16"], {}, "model.dtype=float16 is not supported on CPU"),
    (["--dtype", "float64"], {}, "invalid choice"),
    # what only the model folder or this machine can say, said before the port opens
    (["--device", "garbage"], {}, "model.device='garbage' is not a device name"),
    (["--device", "cuda:abc"], {}, "is not a device name"),
    ([], {"TURBOSERVE_MODEL__MAX_INPUT_LENGTH": "1000"}, "model.max_input_length=1000 exceeds the model's 512 positions"),
    ([], {"TURBOSERVE_MODEL__DEFAULT_PROMPT_NAME": "query"}, "is not one of the model's prompts"),
    ([], {"TURBOSERVE_MODEL__POOLING": "splade"}, "model.pooling=splade needs a *ForMaskedLM model"),
    ([], {"TURBOSERVE_SERVER__HOST": "999.1.1.1"}, "server.host '999.1.1.1' does not resolve"),
    ([], {"TURBOSERVE_MODEL__MATRYOSHKA_DIMENSIONS": "[1000,384]"}, "model.matryoshka_dimensions=[1000, 384]: each must be from 1"),
    ([], {"TURBOSERVE_MODEL__NUM_THREADS": "100000"}, "model.num_threads: Input should be less than or equal to 1024"),
])
def test_invalid_settings_fail_at_start_naming_the_field(args, env, needle):
    out = run("serve", *args, env=env)
    assert out.returncode == 2
    assert needle in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["serve", "profile"])
def test_a_broken_model_folder_stops_the_command_before_the_port_opens(tmp_path, command):
    """A Git LFS pointer in place of the weights passed the folder check: serve opened its port and stayed unready
    for good, profile printed a traceback."""
    from models.config import default_model_path  # noqa: PLC0415

    folder = tmp_path / "lfs"
    folder.mkdir()
    for item in default_model_path().iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).symlink_to(item, target_is_directory=item.is_dir())
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:53aa51\nsize 90868376\n")
    out = run(command, "--model", str(folder), *(["--port", str(_free_port())] if command == "serve" else []))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == (f"turboserve: model.path: {folder}/model.safetensors is a Git LFS pointer, not "
                                           f"the weights: run `git lfs pull` in {folder} (or download the model again)")


def test_ctrl_c_outside_the_server_is_one_line_and_status_130(monkeypatch, capsys):
    """Ctrl-C while the settings or the model folder are checked, or during profile or import-embeddings, printed a
    KeyboardInterrupt traceback."""
    from server import cli  # noqa: PLC0415

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_settings", interrupted)
    try:
        statuses = [main(["profile"]), main(["serve"])]
    except KeyboardInterrupt:  # caught here: escaping, it would stop the whole test session
        pytest.fail("KeyboardInterrupt escaped main()")
    assert statuses == [130, 130] and capsys.readouterr().err == "turboserve: interrupted\n" * 2


def test_a_misspelt_environment_variable_is_warned_about():
    out = run("serve", "--port", "99999", env={"TURBOSERVE_SERVR__PORT": "1", "TURBOSERVE_SERVER_PORT": "1"})
    assert "TURBOSERVE_SERVR__PORT names no setting" in out.stderr and "TURBOSERVE_SERVER_PORT names no setting" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_a_cuda_device_on_a_machine_without_one_fails_at_start():
    out = run("serve", "--device", "cuda")
    assert out.returncode == 2 and "no such CUDA device here" in out.stderr and "Traceback" not in out.stderr
    out = run("profile", "--device", "cuda")
    assert out.returncode == 2 and "no such CUDA device here" in out.stderr


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_a_port_in_use_fails_at_start_before_the_model_loads(flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = [flag, str(port)] + (["--port", str(_free_port())] if flag == "--grpc-port" else [])
        started = time.monotonic()
        out = run("serve", *args)
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in out.stderr and "Traceback" not in out.stderr
    assert time.monotonic() - started < 30  # not after loading and profiling the model


def test_serve_holds_its_port_from_the_start():
    """serve binds and listens before anything loads and hands that socket to uvicorn: a port taken while the model
    loaded made uvicorn's own bind fail after start-up, with the loader running (the process aborted, SIGABRT)."""
    from server.cli import _bind  # noqa: PLC0415

    (held,) = _bind("127.0.0.1", 0, "server.port")
    try:
        port = held.getsockname()[1]
        assert "cannot listen on" in _bind("127.0.0.1", port, "server.port")  # as uvicorn would bind: SO_REUSEADDR
    finally:
        held.close()


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
        assert f"Uvicorn running on http://127.0.0.1:{port}" in log  # said by serve, which binds the socket itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- turboserve import-embeddings ---------------------------------------------------------------------
def _stored(db, table, keys):
    tier = PersistentTier(db, read_only=True)
    try:
        vectors, found = tier.lookup(table, torch.tensor(keys, dtype=torch.int64))
        return np.asarray(vectors), np.asarray(found), tier.tables[table]
    finally:
        tier.close()


def test_import_embeddings_npy_through_the_entry_point_then_lookups_return_the_rows(tmp_path):
    rows = np.random.default_rng(0).standard_normal((70_000, 8)).astype(np.float32)  # more than one 64k chunk
    np.save(tmp_path / "users.npy", rows)
    db = tmp_path / "db"
    out = run("import-embeddings", "--table", "users", "--file", str(tmp_path / "users.npy"), "--path", str(db),
              "--default-vector", "0.5")
    assert out.returncode == 0, out.stderr
    assert "imported 70,000 rows of dim 8 into table 'users'" in out.stdout
    assert "importing users" in out.stderr  # the progress bar
    vectors, found, spec = _stored(db, "users", [0, 65_536, 69_999, 70_000])
    assert found.tolist() == [True, True, True, False]
    np.testing.assert_array_equal(vectors[:3], rows[[0, 65_536, 69_999]])
    assert vectors[3].tolist() == [0.5] * 8 and spec.rows == 70_000


def test_import_embeddings_safetensors_and_csv(tmp_path):
    db = str(tmp_path / "db")
    items = torch.randn(30, 4)
    other = torch.randn(5, 4).to(torch.bfloat16)
    save_file({"items": items, "other": other}, str(tmp_path / "tables.safetensors"))
    assert main(["import-embeddings", "--table", "items", "--file", str(tmp_path / "tables.safetensors"), "--path", db,
                 "--no-progress"]) == 0  # the tensor named like the table
    assert main(["import-embeddings", "--table", "small", "--file", str(tmp_path / "tables.safetensors"), "--tensor", "other",
                 "--path", db, "--no-progress", "--chunk-rows", "2"]) == 0
    vectors, found, _ = _stored(db, "items", [0, 29])
    assert found.all() and np.array_equal(vectors, items[[0, 29]].numpy())
    vectors, found, _ = _stored(db, "small", [4])
    assert found.all() and np.array_equal(vectors[0], other[4].float().numpy())  # bfloat16 read as float32

    (tmp_path / "keyed.csv").write_text("key,a,b\n10,0.5,1\n-3,2,2.5\n1000000000000,1e3,-1\n")
    assert main(["import-embeddings", "--table", "k", "--file", str(tmp_path / "keyed.csv"), "--path", db, "--no-progress"]) == 0
    vectors, found, _ = _stored(db, "k", [10, -3, 1_000_000_000_000, 0])
    assert found.tolist() == [True, True, True, False]
    assert vectors[:3].tolist() == [[0.5, 1], [2, 2.5], [1000, -1]]
    (tmp_path / "ordered.txt").write_text("1,2,3\n4,5,6\n")
    assert main(["import-embeddings", "--table", "o", "--file", str(tmp_path / "ordered.txt"), "--format", "csv",
                 "--csv-layout", "ordered", "--path", db, "--no-progress"]) == 0
    vectors, found, _ = _stored(db, "o", [0, 1])
    assert found.all() and vectors.tolist() == [[1, 2, 3], [4, 5, 6]]


@pytest.mark.parametrize("setup,args,needle", [
    ({}, ["--table", "t", "--file", "missing.npy"], "no such file"),
    ({"t.npy": (5, 3)}, ["--table", "users", "--file", "t.npy"], "stored with dim 8"),
    ({"bad.csv": "1,2,3\n4,5\n"}, ["--table", "t", "--file", "bad.csv"], "line 2 has 2 fields, expected 3"),
    ({"bad.csv": "1,2,3\n4,x,5\n"}, ["--table", "t", "--file", "bad.csv"], "line 2 holds a value that is not a number"),
    ({"bad.csv": "1,2,3\n4.5,1,5\n"}, ["--table", "t", "--file", "bad.csv"], "key '4.5' is not an integer"),
    ({"t.npy": (5, 3)}, ["--table", "t", "--file", "t.npy", "--default-vector", "1,2"], "--default-vector has 2 values"),
    ({"t.npy": (5, 3)}, ["--table", "t", "--file", "t.npy", "--default-vector", "nan"], "must be finite"),
    ({"t.npy": (5, 3)}, ["--table", "t", "--file", "t.npy", "--default-vector", "0,1e39,0"], "must be finite"),
    ({"t.bin": "x"}, ["--table", "t", "--file", "t.bin"], "pass --format"),
    ({"hex.csv": "1,0x10,0\n2,3,4\n"}, ["--table", "t", "--file", "hex.csv"], "line 1 holds a value that is not a number"),
    ({"under.csv": "1,1_000,0\n"}, ["--table", "t", "--file", "under.csv"], "line 1 holds a value that is not a number"),
    ({"big.csv": "1,1e39,0\n"}, ["--table", "t", "--file", "big.csv"], "hold NaN or infinity"),
    ({"t.npy": (5, 3)}, ["--table", "default", "--file", "t.npy"], "RocksDB's own column family"),
    ({"two.safetensors": None}, ["--table", "t", "--file", "two.safetensors"], "pick one with --tensor"),
])
def test_import_embeddings_errors_exit_2_without_a_traceback(tmp_path, capsys, setup, args, needle):
    db = str(tmp_path / "db")
    np.save(tmp_path / "users.npy", np.zeros((4, 8), np.float32))
    assert main(["import-embeddings", "--table", "users", "--file", str(tmp_path / "users.npy"), "--path", db, "--no-progress"]) == 0
    for name, content in setup.items():
        if name.endswith(".npy"):
            np.save(tmp_path / name, np.zeros(content, np.float32))
        elif name.endswith(".safetensors"):
            save_file({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, str(tmp_path / name))
        else:
            (tmp_path / name).write_text(content)
    capsys.readouterr()
    args = [str(tmp_path / a) if a.endswith((".npy", ".csv", ".bin", ".safetensors")) else a for a in args]
    assert main(["import-embeddings", *args, "--path", db, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and "RuntimeWarning" not in err and err.startswith("turboserve: ")


def test_import_embeddings_of_an_empty_npy_imports_nothing(tmp_path, capsys):
    """A 0-row .npy is an empty import (as a header-only CSV is), not a traceback."""
    db = str(tmp_path / "db")
    np.save(tmp_path / "zero.npy", np.zeros((0, 3), np.float32))
    assert main(["import-embeddings", "--table", "z", "--file", str(tmp_path / "zero.npy"), "--path", db, "--no-progress"]) == 0
    assert "imported 0 rows of dim 3" in capsys.readouterr().out
    _, found, _ = _stored(db, "z", [0])
    assert not found.any()


def test_import_embeddings_csv_with_a_byte_order_mark_keeps_its_first_row(tmp_path):
    db = str(tmp_path / "db")
    (tmp_path / "bom.csv").write_bytes("\ufeff1,0.5,1\n2,2,2.5\n".encode())
    assert main(["import-embeddings", "--table", "b", "--file", str(tmp_path / "bom.csv"), "--path", db, "--no-progress"]) == 0
    vectors, found, _ = _stored(db, "b", [1, 2])
    assert found.all() and vectors.tolist() == [[0.5, 1], [2, 2.5]]


def test_a_failed_import_leaves_no_table_behind(tmp_path, capsys):
    """A file refused before any row was written (NaN on its first chunk) leaves no half-made table: the corrected
    file, of another dim and with another default, goes in (it was 'stored with dim 2', the old default kept)."""
    db = str(tmp_path / "db")
    (tmp_path / "bad.csv").write_text("1,nan,2\n")
    assert main(["import-embeddings", "--table", "t", "--file", str(tmp_path / "bad.csv"), "--path", db,
                 "--default-vector", "9", "--no-progress"]) == 2
    np.save(tmp_path / "good.npy", np.ones((3, 4), np.float32))
    assert main(["import-embeddings", "--table", "t", "--file", str(tmp_path / "good.npy"), "--path", db,
                 "--default-vector", "0", "--no-progress"]) == 0
    vectors, found, _ = _stored(db, "t", [0, 7])
    assert found.tolist() == [True, False] and vectors.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]


def test_recommendation_settings_the_server_cannot_serve_are_refused_at_start(tmp_path):
    """A DLRM folder that is not one, a DLRM named as the encoder or the re-ranker is served, an embedding store another process
    holds, a table whose dim the DLRM does not take: one line, exit 2, before the port opens (the server stayed up,
    unready for good, with a traceback in its log; the same name let the DLRM hide the encoder on KServe)."""
    from tests.cross_encoders import cross_encoder_folder  # noqa: PLC0415
    from tests.server.recommend_support import make_dlrm  # noqa: PLC0415

    made = make_dlrm(tmp_path / "dlrm")
    base = {"TURBOSERVE_EMBEDDINGS__ENABLED": "true", "TURBOSERVE_EMBEDDINGS__PATH": str(made["db"]),
            "TURBOSERVE_RECOMMEND__MODEL_PATH": str(made["folder"])}
    cases = [
        ({"TURBOSERVE_RECOMMEND__MODEL_PATH": str(tmp_path / "nowhere")}, "recommend.model_path: model folder"),
        ({"TURBOSERVE_RECOMMEND__NAME": "all-MiniLM-L6-v2"}, "is also the encoder's name"),
        ({"TURBOSERVE_RECOMMEND__NAME": "ranker", "TURBOSERVE_RERANKER__NAME": "ranker",
          "TURBOSERVE_RERANKER__PATH": str(cross_encoder_folder(tmp_path))}, "is also the re-ranker's name"),
        ({"TURBOSERVE_EMBEDDINGS__CACHE_ROWS": str(10 ** 11)}, "lower embeddings.cache_fraction or set embeddings.cache_rows"),
    ]
    for extra, needle in cases:
        out = run("serve", "--port", "0", env={**base, **extra})
        assert out.returncode == 2 and needle in out.stderr and "Traceback" not in out.stderr, (extra, out.stderr[-2000:])
    holder = PersistentTier(made["db"])  # another process's lock: here, this one's
    try:
        out = run("serve", "--port", "0", env=base)
        assert out.returncode == 2 and "cannot open the embedding store" in out.stderr, out.stderr[-2000:]
    finally:
        holder.close()
    other = tmp_path / "other"
    np.save(tmp_path / "narrow.npy", np.zeros((5, 2), np.float32))
    store = PersistentTier(made["db"], read_only=True)
    table = next(t for t in store.tables if t != "scratch")
    store.close()
    assert main(["import-embeddings", "--table", table, "--file", str(tmp_path / "narrow.npy"), "--path", str(other),
                 "--no-progress"]) == 0
    out = run("serve", "--port", "0", env={**base, "TURBOSERVE_EMBEDDINGS__PATH": str(other)})
    assert out.returncode == 2 and f"table {table!r} is stored with dim 2" in out.stderr, out.stderr[-2000:]
