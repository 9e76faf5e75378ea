"""deploy/k8s's embedding settings: every pod shares Redis, consumes the update stream in its own group, and
reads its own RocksDB copy, which its init container imports into the very directory the server opens."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from configs.settings import load_settings
from embeddings.stream_format import group_name

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "deployment.yaml"


def _pod() -> dict:
    return yaml.safe_load(DEPLOYMENT.read_text())["spec"]["template"]


def _settings_of(container: dict, pod_name: str, monkeypatch: pytest.MonkeyPatch):
    """The Settings a container of pod `pod_name` builds from its env (downward API fields filled in)."""
    for entry in container["env"]:
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
        else:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", entry
            monkeypatch.setenv(entry["name"], pod_name)
    return load_settings()


def test_each_pod_shares_redis_and_consumes_the_stream_in_its_own_group(monkeypatch):
    (container,) = _pod()["spec"]["containers"]
    groups = set()
    for pod_name in ("turboserve-7d9f-abcde", "turboserve-7d9f-fghij"):
        with monkeypatch.context() as m:
            emb = _settings_of(container, pod_name, m).embeddings
        assert emb.enabled and emb.volatile_backend == "redis" and emb.update_stream
        assert emb.update_consumer == pod_name
        groups.add(group_name(emb.update_group, emb.update_consumer))
    assert len(groups) == 2, groups  # one group a pod: every pod applies every update


def test_each_pod_imports_its_own_rocksdb_copy_where_the_server_opens_it(monkeypatch):
    pod = _pod()
    (container,) = pod["spec"]["containers"]
    with monkeypatch.context() as m:
        path = _settings_of(container, "turboserve-0", m).embeddings.path
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}

    def volume_at(c: dict, mount_path: str) -> str:
        (name,) = [v["name"] for v in c["volumeMounts"] if v["mountPath"] == mount_path]
        return name

    served = volume_at(container, path)
    assert "emptyDir" in volumes[served]  # per pod: RocksDB allows one process a directory
    (init,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "import-embeddings"]
    assert volume_at(init, path) == served and init["image"] == container["image"]
    script = " ".join(init["args"])
    assert "turboserve import-embeddings" in script and f"--path {path}" in script
