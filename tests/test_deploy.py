"""Deployment artifacts, checked with real tools and against the running app.

kubectl kustomize renders both overlays; kubernetes-validate checks every object against the
Kubernetes 1.30 schemas (strict: unknown fields fail); hadolint lints the Dockerfile;
promtool parses every PromQL expression. Probe paths, ports and every metric name the HPA
rule and the Grafana dashboard use are checked against a real server's routes and /metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from moeserve.cli import build_parser
from moeserve.server.serve import _UVICORN_GRACE_S
from tests.server_fixture import RunningServer, build_checkpoint, serving

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests promise to work on
# ServerState.drain waits this long for the requests it stopped (state.py) before uvicorn's
# own grace for open connections (_UVICORN_GRACE_S) starts.
DRAIN_KILL_WAIT_S = 5.0
# Labels Prometheus adds at scrape time (pod annotations job or ServiceMonitor), not the app.
SCRAPE_LABELS = {"namespace", "pod"}
# Grafana variables, replaced by a plausible value before promtool parses an expression.
GRAFANA_VARS = {"$__rate_interval": "1m", "$namespace": ".*", "$pod": ".*", "$layer": "1"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:  # .ci/run installs them (the `test` extra); say so rather than pass
        pytest.skip(f"{name} not installed (pip install -e '.[test]')")
    return path


def kustomize(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [_tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, kustomize(DEPLOY / "overlays" / request.param)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [c] = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def config_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment: the generated ConfigMap, then its own `env` values."""
    env = dict(one(docs, "ConfigMap")["data"])
    env.update({e["name"]: e.get("value") for e in container(docs)["env"]})
    return env


# ----------------------------------------------------------------------- Kubernetes objects
def test_overlay_validates_against_kubernetes_schemas(overlay: tuple[str, list]) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    name, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
    } <= kinds, kinds
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises on any schema violation


def test_validation_is_strict() -> None:
    """The schema check above would catch a misspelt field (it is not a no-op)."""
    kv = pytest.importorskip("kubernetes_validate")
    deployment = one(kustomize(DEPLOY / "overlays" / "cpu"), "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_pod_security_and_resources(overlay: tuple[str, list]) -> None:
    name, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    c = container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # The one writable place, where the image points HOME and the caches.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    res = c["resources"]
    assert {"cpu", "memory"} <= set(res["requests"]) and {"cpu", "memory"} <= set(res["limits"])
    key = next(e for e in c["env"] if e["name"] == "MOESERVE_API_KEY")
    assert "secretKeyRef" in key["valueFrom"]  # never a literal key in a manifest
    # A Service called moeserve would inject MOESERVE_PORT=tcp://..., which the CLI would read.
    assert pod["enableServiceLinks"] is False
    if name == "gpu":
        assert res["limits"]["nvidia.com/gpu"] == 1
        assert pod["nodeSelector"] and pod["tolerations"]
        model_mount = next(m for m in c["volumeMounts"] if m["name"] == "models")
        assert model_mount["readOnly"] is True
        claim = volumes["models"]["persistentVolumeClaim"]["claimName"]
        assert one(docs, "PersistentVolumeClaim")["metadata"]["name"] == claim
        assert config_env(docs)["MOESERVE_MODEL"].startswith(model_mount["mountPath"] + "/")
    else:
        assert not any("nvidia.com/gpu" in r for r in res.values())
        assert "MOESERVE_MODEL" not in config_env(docs)  # the packaged demo model


def test_config_variables_are_real_serve_flags(
    overlay: tuple[str, list], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MOESERVE_* variable that `moeserve serve` does not know would be silently ignored,
    and one whose value does not parse would stop the server: both fail here."""
    name, docs = overlay
    env = {k: v for k, v in config_env(docs).items() if k.startswith("MOESERVE_")}
    for var in list(os.environ):
        if var.startswith("MOESERVE_"):
            monkeypatch.delenv(var)
    for var, value in env.items():
        monkeypatch.setenv(var, value if value is not None else "secret")
    args = build_parser().parse_args(["serve"])  # exits (SystemExit) on a value that fails
    known = {"MOESERVE_" + dest.upper() for dest in vars(args)}
    assert set(env) <= known, f"not `moeserve serve` options: {sorted(set(env) - known)}"
    assert args.host == "0.0.0.0" and args.port == 8000


def test_shutdown_fits_in_the_grace_period(overlay: tuple[str, list]) -> None:
    """terminationGracePeriodSeconds > preStop + --shutdown-timeout + the server's exit work,
    or the kubelet kills a drain that is still within its timeout."""
    name, docs = overlay
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    pre_stop = container(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    shutdown_timeout = float(config_env(docs)["MOESERVE_SHUTDOWN_TIMEOUT"])
    needed = float(pre_stop[1]) + shutdown_timeout + DRAIN_KILL_WAIT_S + _UVICORN_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed, (name, needed)


def test_service_pdb_and_hpa_select_the_pods(overlay: tuple[str, list]) -> None:
    name, docs = overlay
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for doc in (one(docs, "Service"), one(docs, "PodDisruptionBudget")):
        selector = doc["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), doc["kind"]
    ref = one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert (
        container(docs)["envFrom"][0]["configMapRef"]["name"]
        == (one(docs, "ConfigMap")["metadata"]["name"])
    )  # the hashed name, rewritten


def test_servicemonitor_component(tmp_path: Path) -> None:
    rel = os.path.relpath(DEPLOY, tmp_path)  # kustomize takes only relative paths here
    (tmp_path / "kustomization.yaml").write_text(
        f"resources: [{rel}/overlays/cpu]\ncomponents: [{rel}/components/servicemonitor]\n"
    )
    docs = kustomize(tmp_path)
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


# ------------------------------------------------------------------------------ container
def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [
        (ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
        for ln in joined.splitlines()
        if ln.strip()
    ]


def test_dockerfile_passes_hadolint() -> None:
    out = subprocess.run(
        [_tool("hadolint"), str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_contract() -> None:
    ins = dockerfile_instructions()
    args = {k: v for k, v in (a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)}
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) >= 2  # multi-stage
    assert "cuda" in args["CUDA_IMAGE"] and "runtime" in args["CUDA_IMAGE"]
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    entry = json.loads(next(a for i, a in ins if i == "ENTRYPOINT"))  # JSON: exec form
    assert entry[-2:] == ["moeserve", "serve"]
    env = " ".join(a for i, a in ins if i == "ENV")
    assert "MOESERVE_HOST=0.0.0.0" in env and "MOESERVE_PORT=8000" in env
    assert [a for i, a in ins if i == "EXPOSE"] == ["8000"]
    [health] = [a for i, a in ins if i == "HEALTHCHECK"]
    assert "/health" in health and "CMD [" in health
    ignore = (ROOT / ".dockerignore").read_text().split()
    # An allow-list: everything out except what the build copies.
    assert ignore[ignore.index("*") + 1 :][:3] == ["!pyproject.toml", "!README.md", "!moeserve/"]


# ---------------------------------------------------------------- against the running app
@pytest.fixture(scope="module")
def app_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Offloading on (2 of 6 experts per layer cached, misses copied), so the expert cache
    # series the dashboard shows exist in the scrape.
    offload = {"expert_cache_slots": 2, "offload_mode": "fetch"}
    yield from serving(build_checkpoint(tmp_path_factory), engine_kwargs=offload)


@pytest.fixture(scope="module")
def scrape(app_server: RunningServer) -> dict[str, list[dict[str, str]]]:
    """Sample name -> label sets, from /metrics after a few real requests."""
    from prometheus_client.parser import text_string_to_metric_families

    http = app_server.client()
    for body in (
        {"prompt": "Hello there", "max_tokens": 4},
        {"prompt": "Once upon", "max_tokens": 3, "stream": True},
    ):
        assert http.post("/v1/completions", json={"model": "tiny-moe", **body}).status_code == 200
    assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
    samples: dict[str, list[dict[str, str]]] = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        for s in fam.samples:
            samples.setdefault(s.name, []).append(dict(s.labels))
    return samples


def test_probe_paths_and_ports_exist_in_the_app(
    overlay: tuple[str, list], app_server: RunningServer
) -> None:
    name, docs = overlay
    # The probes and /metrics are routes of the app itself (the /v1 ones sit in a router).
    routes = {getattr(r, "path", None) for r in app_server.server.config.app.routes}
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    http = app_server.client()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] in routes, (probe, get["path"])
        assert http.get(get["path"]).status_code == 200, probe
        assert get["port"] in ports
    assert c["startupProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    # Room for a long load before the first liveness check: minutes for the small demo
    # model on CPU, half an hour for tens of GB from a network volume.
    startup = c["startupProbe"]
    room = {"cpu": 120, "gpu": 1800}[name]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= room
    assert ports["http"] == int(config_env(docs)["MOESERVE_PORT"]) == 8000
    service_port = one(docs, "Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == "http"
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in routes
    assert int(annotations["prometheus.io/port"]) == ports["http"]


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bmoeserve_[a-z0-9_]+", expr))


def _check_expr(expr: str, scrape: dict[str, list[dict[str, str]]]) -> None:
    names = _metric_names(expr)
    assert names, f"no moeserve metric in {expr!r}"
    missing = names - set(scrape)
    assert not missing, f"{sorted(missing)} not in a real /metrics scrape ({expr!r})"
    # Labels grouped by or matched on must exist on those series too.
    used = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        used |= {x.strip() for x in group.split(",") if x.strip()}
    used |= set(re.findall(r"([a-z_]+)\s*=~?\s*\"", expr))
    have = {k for n in names for labels in scrape[n] for k in labels}
    assert used - SCRAPE_LABELS <= have, (expr, sorted(used - SCRAPE_LABELS - have))


def adapter_rules() -> list[dict[str, Any]]:
    return yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())["rules"][
        "custom"
    ]


def test_hpa_metric_is_served_by_the_adapter_rule(
    overlay: tuple[str, list], scrape: dict[str, list[dict[str, str]]]
) -> None:
    name, docs = overlay
    [metric] = one(docs, "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods"
    wanted = metric["pods"]["metric"]["name"]
    [rule] = [r for r in adapter_rules() if r["name"]["as"] == wanted]
    _check_expr(rule["seriesQuery"], scrape)
    assert _metric_names(rule["seriesQuery"]) == {"moeserve_num_requests_waiting"}
    assert re.fullmatch(rule["name"]["matches"], "moeserve_num_requests_waiting")
    assert set(rule["resources"]["overrides"]) == SCRAPE_LABELS


def dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "grafana" / "moeserve-dashboard.json").read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_metrics_exist(scrape: dict[str, list[dict[str, str]]]) -> None:
    for _, expr in dashboard_exprs():
        _check_expr(expr, scrape)


def test_dashboard_structure() -> None:
    dash = dashboard()
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
    defined = {v["name"] for v in dash["templating"]["list"]}
    for _, expr in dashboard_exprs():
        assert set(re.findall(r"\$(\w+)", expr)) - {"__rate_interval"} <= defined
    titles = " | ".join(p["title"].lower() for p in panels)
    for view in (
        "requests / s",
        "time to first token",
        "inter-token",
        "end-to-end",
        "kv cache",
        "queue",
        "expert load imbalance",
        "expert load, layer",
        "expert cache hit rate",
        "bytes moved",
    ):
        assert view in titles, view
    [heatmap] = [p for p in panels if p["type"] == "heatmap"]
    assert (
        heatmap["repeat"] == "layer"
        and "moeserve_expert_tokens_total" in (heatmap["targets"][0]["expr"])
    )


def test_promql_parses_with_promtool(tmp_path: Path) -> None:
    """Every dashboard query and the adapter's query (templates filled in) is valid PromQL."""
    promtool = _tool("promtool")
    exprs = [e for _, e in dashboard_exprs()]
    for rule in adapter_rules():
        exprs.append(rule["seriesQuery"])
        exprs.append(
            rule["metricsQuery"]
            .replace("<<.Series>>", "moeserve_num_requests_waiting")
            .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"moeserve-.*"')
            .replace("<<.GroupBy>>", "pod")
        )
    rules = []
    for i, expr in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"check:expr_{i}", "expr": expr})
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "moeserve", "rules": rules}]}))
    out = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
