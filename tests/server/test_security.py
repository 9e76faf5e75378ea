"""Security settings against the real app and the real CLI: which paths need the API key, the key from a
file, keys kept out of error messages, CORS with a key, model folders confined to server.model_dirs,
pickle-based weights refused."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from configs.settings import PathNotAllowed, Settings, check_model_dirs, load_settings
from models.config import ModelFolderError, default_model_path
from models.folder import PICKLE_SUFFIXES, read_model_folder
from server.app import create_app
from tests.support import BIN, MODEL, dummy_server

KEY = "k3y-for-tests"
AUTH = {"authorization": f"Bearer {KEY}"}


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN), *args], check=False, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


# -- API key: open paths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("open_paths,expect_open", [
    ([], set()),  # everything behind the key, /metrics and the probes included
    (["/metrics"], {"/metrics"}),
    (["/health", "/v2/health/live"], {"/health", "/v2/health/live"}),
])
def test_open_paths_are_configurable(open_paths, expect_open):
    probes = ("/health", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready")
    with dummy_server(server={"api_key": KEY, "api_key_open_paths": open_paths}) as s, s.client() as c:
        for path in probes:
            status = c.get(path).status_code
            assert status == (200 if path in expect_open else 401), (path, status)
            assert c.get(path, headers=AUTH).status_code == 200, path
        # Open paths match exactly: a prefix or a sibling of an open path still needs the key.
        assert c.post("/embed", json={"inputs": "x"}).status_code == 401
        assert c.get("/metrics/").status_code == 401
        assert c.post("/embed", json={"inputs": "x"}, headers=AUTH).status_code == 200


def test_default_open_paths_are_the_probes_and_metrics():
    assert Settings().server.api_key_open_paths == ["/health", "/ping", "/metrics", "/v2/health/live", "/v2/health/ready"]


def test_open_paths_must_start_with_a_slash():
    with pytest.raises(ValidationError, match=r"api_key_open_paths entries must start with '/': \['metrics'\]"):
        Settings(server={"api_key_open_paths": ["/health", "metrics"]})


def test_open_paths_from_the_environment(monkeypatch):
    monkeypatch.setenv("TURBOSERVE_SERVER__API_KEY_OPEN_PATHS", "[]")
    assert load_settings().server.api_key_open_paths == []


# -- API key: from a file, never echoed ---------------------------------------------------------------------
def test_api_key_file_is_read_and_used(tmp_path):
    secret = tmp_path / "api-key"
    secret.write_text(KEY + "\n")  # mounted secrets often end with a newline
    with dummy_server(server={"api_key_file": str(secret)}) as s, s.client() as c:
        assert c.post("/embed", json={"inputs": "x"}).status_code == 401
        assert c.post("/embed", json={"inputs": "x"}, headers=AUTH).status_code == 200
        assert c.post("/embed", json={"inputs": "x"}, headers={"authorization": f"Bearer {KEY}x"}).status_code == 401
    assert KEY not in repr(load_settings(None, {"server": {"api_key_file": str(secret)}}))  # SecretStr


@pytest.mark.parametrize("server,message", [
    ({"api_key_file": "MISSING"}, "cannot read server.api_key_file"),
    ({"api_key_file": "EMPTY"}, "is empty"),
    ({"api_key_file": "GOOD", "api_key": KEY}, "set one of server.api_key and server.api_key_file"),
    ({"api_key": ""}, "server.api_key is empty"),
])
def test_api_key_file_errors(tmp_path, server, message):
    files = {"MISSING": tmp_path / "missing", "EMPTY": tmp_path / "empty", "GOOD": tmp_path / "good"}
    files["EMPTY"].write_text(" \n")
    files["GOOD"].write_text(KEY)
    server = {k: str(files.get(v, v)) for k, v in server.items()}
    with pytest.raises(ValidationError, match=message):
        Settings(server=server)


def test_cli_errors_do_not_echo_the_key(tmp_path):
    # A section-level error gets the whole section as its input; the message must not print it.
    out = run_cli("serve", "--api-key", KEY, env={"TURBOSERVE_SERVER__API_KEY_OPEN_PATHS": '["metrics"]'})
    assert out.returncode == 2 and "api_key_open_paths entries must start with '/'" in out.stderr
    assert KEY not in out.stderr and "Traceback" not in out.stderr
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY)
    out = run_cli("serve", "--api-key", KEY, "--api-key-file", str(keyfile))
    assert out.returncode == 2 and "set one of server.api_key and server.api_key_file" in out.stderr
    assert KEY not in out.stderr


# -- CORS with an API key -------------------------------------------------------------------------------
def test_cors_preflight_needs_no_key_and_a_401_is_readable_by_the_browser():
    origin = {"origin": "https://app.example"}
    with dummy_server(server={"api_key": KEY, "cors_origins": ["https://app.example"]}) as s, httpx.Client(base_url=s.url) as c:
        r = c.options("/v1/embeddings", headers={**origin, "access-control-request-method": "POST",
                                                 "access-control-request-headers": "authorization"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/v1/embeddings", json={"input": "x", "model": MODEL}, headers=origin)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.post("/v1/embeddings", json={"input": "x", "model": MODEL}, headers={**origin, **AUTH})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        r = c.options("/embed", headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


# -- model folders confined to server.model_dirs -------------------------------------------------------------
@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    allowed, outside = tmp_path / "models", tmp_path / "elsewhere"
    (allowed / "inside").mkdir(parents=True)
    (outside / "model").mkdir(parents=True)
    (allowed / "escape").symlink_to(outside / "model", target_is_directory=True)  # a link out of the allowed dir
    (outside / "link-in").symlink_to(allowed / "inside", target_is_directory=True)  # a link from outside, into it
    return {"allowed": allowed, "outside": outside}


def _confined(allowed: Path, **sections) -> Settings:
    return Settings(server={"model_dirs": [str(allowed)]}, **sections)


def test_confinement_accepts_inside_and_refuses_outside(dirs):
    allowed, outside = dirs["allowed"], dirs["outside"]
    check_model_dirs(_confined(allowed, model={"path": str(allowed / "inside")}))
    check_model_dirs(_confined(allowed, model={"path": str(outside / "link-in")}))  # resolves inside
    check_model_dirs(_confined(allowed))  # no model.path: the embedded model is always allowed
    check_model_dirs(Settings(model={"path": str(outside / "model")}))  # no model_dirs: no restriction
    with pytest.raises(PathNotAllowed, match=rf"model.path {outside / 'model'} is outside server.model_dirs: {allowed}"):
        check_model_dirs(_confined(allowed, model={"path": str(outside / "model")}))
    with pytest.raises(PathNotAllowed, match=rf"resolves to {outside / 'model'}\) is outside"):
        check_model_dirs(_confined(allowed, model={"path": str(allowed / "escape")}))
    with pytest.raises(PathNotAllowed, match="model.path"):  # .. cannot climb out either
        check_model_dirs(_confined(allowed, model={"path": str(allowed / "inside" / ".." / ".." / "elsewhere" / "model")}))
    with pytest.raises(PathNotAllowed, match="recommend.model_path"):
        check_model_dirs(_confined(allowed, recommend={"model_path": str(allowed / "escape")}))
    # A sibling whose name starts like the allowed dir is not inside it.
    (allowed.parent / "models-evil").mkdir()
    with pytest.raises(PathNotAllowed):
        check_model_dirs(_confined(allowed, model={"path": str(allowed.parent / "models-evil")}))


def test_confinement_through_the_cli_is_one_line_and_exit_2(dirs):
    allowed = dirs["allowed"]
    env = {"TURBOSERVE_SERVER__MODEL_DIRS": f'["{allowed}"]'}
    for path in (dirs["outside"] / "model", allowed / "escape"):
        out = run_cli("serve", "--model", str(path), env=env)
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert out.stderr.startswith(f"turboserve: model.path {path}") and f"server.model_dirs: {allowed}" in out.stderr
    # Inside the allowed dir, the next check runs: the folder itself (empty here) is what is wrong.
    out = run_cli("serve", "--model", str(allowed / "inside"), env=env)
    assert out.returncode == 2 and "has no config.json" in out.stderr and "model_dirs" not in out.stderr


def test_create_app_refuses_a_path_outside_too(dirs):
    with pytest.raises(PathNotAllowed):
        create_app(_confined(dirs["allowed"], model={"path": str(dirs["outside"] / "model")}))


# -- weights only from safetensors --------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", PICKLE_SUFFIXES)
def test_pickle_weights_are_refused_by_name(tmp_path, suffix):
    embedded = default_model_path()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / name).write_bytes((embedded / name).read_bytes())
    (tmp_path / f"pytorch_model{suffix}").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(ModelFolderError, match=rf"found pytorch_model\{suffix}: pickle-based weights are refused; convert them to safetensors"):
        read_model_folder(tmp_path)
    out = run_cli("serve", "--model", str(tmp_path))
    assert out.returncode == 2 and "pickle-based weights are refused" in out.stderr and "Traceback" not in out.stderr


# -- tokens per input, on every embedding route ----------------------------------------------------------------
def _routes(text: str, truncate: bool | None):
    kserve = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}
    if truncate is not None:
        kserve["parameters"] = {"truncate": truncate}
    tei = {"inputs": text} if truncate is None else {"inputs": text, "truncate": truncate}
    return {"/v1/embeddings": {"input": text, "model": MODEL}, "/embed": tei, f"/v2/models/{MODEL}/infer": kserve}


def test_tokens_per_input_limit_on_every_route():
    # The dummy serves max_input_length=32: "a" x 30 plus [CLS] and [SEP] is exactly at the limit.
    at_limit, over = " ".join(["a"] * 30), " ".join(["a"] * 31)
    with dummy_server() as s, s.client() as c:
        tokenizer = s.app.state.engine.tokenizer
        assert len(tokenizer.encode([at_limit])[0].ids) == 32 and len(tokenizer.encode([over], truncate=True)[0].ids) == 32
        for path, body in _routes(at_limit, None).items():
            assert c.post(path, json=body).status_code == 200, path
        for path, body in _routes(over, None).items():
            r = c.post(path, json=body)
            assert r.status_code == 413 and "32" in r.text, (path, r.text)
        for path, body in _routes(over, False).items():
            if path != "/v1/embeddings":  # OpenAI has no truncate field
                assert c.post(path, json=body).status_code == 413, path
        for path, body in _routes(over, True).items():  # TEI and KServe cut it to the limit instead
            if path != "/v1/embeddings":
                r = c.post(path, json=body)
                assert r.status_code == 200 and r.headers["x-compute-tokens"] == "32", path
