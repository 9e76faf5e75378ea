"""deploy/k8s agrees with the server it deploys: probe paths, metric names, ports, drain timing, user."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from configs.settings import load_settings
from server.app import create_app
from tests.support import settings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"


def _docs() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_manifests_match_the_server():
    docs = _docs()
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ServiceMonitor", "Kustomization"} <= set(docs)
    kustomized = set(docs["Kustomization"]["resources"])
    assert kustomized == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    deploy = docs["Deployment"]
    pod = deploy["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]

    # Probes hit routes the app really has: before the model is ready, readiness says 503 and liveness 200.
    app = create_app(settings())
    client = TestClient(app)  # no lifespan: the model never loads
    for probe in ("startupProbe", "readinessProbe"):
        assert client.get(container[probe]["httpGet"]["path"]).status_code == 503
    assert client.get(container["livenessProbe"]["httpGet"]["path"]).status_code == 200
    assert client.get("/v2/health/nothing").status_code == 404

    # The grace period covers the preStop pause plus the server's drain.
    env = {e["name"]: e.get("value") for e in container["env"]}  # valueFrom entries (downward API) have none
    drain = float(env["TURBOSERVE_SERVER__SHUTDOWN_TIMEOUT_S"])
    pause = container["lifecycle"]["preStop"]["exec"]["command"]  # exec, not the sleep action (Kubernetes >= 1.30)
    assert pause[0] == "sleep" and pod["spec"]["terminationGracePeriodSeconds"] > float(pause[1]) + drain
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1

    # Ports and the scrape target line up; the HPA's metric is one the server exports.
    port_name = container["ports"][0]["name"]
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] == port_name
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"] == docs["Service"]["spec"]["ports"][0]["name"]
    exported = generate_latest(app.state.metrics.registry).decode()
    for metric in docs["HorizontalPodAutoscaler"]["spec"]["metrics"]:
        assert re.search(rf"^{metric['pods']['metric']['name']}\b", exported, re.MULTILINE)

    # The pod runs as the image's non-root user.
    dockerfile = (K8S.parents[1] / "Dockerfile").read_text()
    uid = int(re.search(r"useradd --uid (\d+)", dockerfile).group(1))
    assert pod["spec"]["securityContext"]["runAsUser"] == uid and pod["spec"]["securityContext"]["runAsNonRoot"]


def test_image_runs_as_non_root_with_model_dirs_and_probes_need_no_key(monkeypatch):
    dockerfile = (K8S.parents[1] / "Dockerfile").read_text()
    user = re.search(r"useradd --uid (\d+) .* (\w+)\s*(?:\\|$)", dockerfile, re.MULTILINE)
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    # The last USER before ENTRYPOINT is the one the server runs as: the created, non-root one.
    assert users and users[-1] == user.group(2) and users[-1] not in ("root", "0") and int(user.group(1)) >= 1000
    assert dockerfile.index(f"USER {users[-1]}") < dockerfile.index("ENTRYPOINT")

    # The image's and the pod's environment make valid settings that confine models to /models, and the
    # probes and the scrape path stay reachable even when an API key is added.
    for name, value in re.findall(r"^ENV (TURBOSERVE_\w+)='(.*)'$", dockerfile, re.MULTILINE):
        monkeypatch.setenv(name, value)
    (container,) = _docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    for e in container["env"]:
        monkeypatch.setenv(e["name"], e.get("value", "turboserve-0"))  # valueFrom (downward API): the pod name
    monkeypatch.setenv("TURBOSERVE_SERVER__API_KEY", "k")
    s = load_settings()
    assert s.server.model_dirs == ["/models"] and s.server.log_format == "json"
    probes = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    scraped = {e["path"] for e in _docs()["ServiceMonitor"]["spec"]["endpoints"]}
    assert probes | scraped <= set(s.server.api_key_open_paths)
    client = TestClient(create_app(s))
    for path in probes | scraped:
        assert client.get(path).status_code != 401, path
    assert client.get("/v1/models").status_code == 401
