"""The Helm chart (helm/idforge): linted, rendered and validated without a cluster.

helm-python-sdk binds Helm's own Go SDK (a shared library inside the wheel: no helm binary, no
network), so `lint` and `render` here are Helm's. Every rendered object passes
`kubernetes-validate --strict` for the oldest Kubernetes the chart admits; the custom resources
(KEDA ScaledObject and TriggerAuthentication, ServiceMonitor), which kubernetes-validate has no
schema for, are checked against the strict schemas in helm/schemas/. Then the fields that matter
are asserted, and the rendered settings are fed to the service's own `Settings` validation.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import redis
import referencing
import yaml
from celery import Celery

from app.queue import celery_config
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "idforge"
CI_VALUES = CHART / "ci"
CRD_SCHEMAS = ROOT / "helm" / "schemas"
# The oldest Kubernetes Chart.yaml's kubeVersion admits; the manifests use only stable APIs.
K8S_VERSION = "1.29.0"
RELEASE, NAMESPACE = "idf", "ml"
FULLNAME = f"{RELEASE}-idforge"
SECRET = f"{FULLNAME}-secrets"
REQUIRED_SECRET_KEYS = ("IDFORGE_API_KEYS", "IDFORGE_SECRET_KEY", "IDFORGE_WEBHOOK_SECRET",
                        "IDFORGE_S3_ACCESS_KEY_ID", "IDFORGE_S3_SECRET_ACCESS_KEY")
SECRET_SETTINGS = (*REQUIRED_SECRET_KEYS, "IDFORGE_METRICS_TOKEN")
VALUES_FILES = sorted(p.name for p in CI_VALUES.glob("*-values.yaml"))
CRD_SCHEMA_FILES = {("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject-v1alpha1.json",
                    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication-v1alpha1.json",
                    ("monitoring.coreos.com/v1", "ServiceMonitor"): "monitoring-servicemonitor-v1.json"}
BACKLOG_URL = f"http://{FULLNAME}-api.{NAMESPACE}.svc:80/backlog"


# --------------------------------------------------------------------------------------- helpers

def load_values(name: str) -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CI_VALUES / name).read_text())
    return values


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, recursively (a copy)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as c:
        yield c


class Rendered:
    """A render's objects, by kind and name."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self.docs: list[dict[str, Any]] = [
            d for path, text in sorted(files.items()) if path.endswith(".yaml")
            for d in yaml.safe_load_all(text) if d]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [d for d in self.docs if d["kind"] == kind and d["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)} in {self.names()}"
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        return any(d["kind"] == kind and d["metadata"]["name"] == name for d in self.docs)

    def names(self) -> list[str]:
        return sorted(f"{d['kind']}/{d['metadata']['name']}" for d in self.docs)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def config(self) -> dict[str, str]:
        data: dict[str, str] = self.get("ConfigMap", FULLNAME)["data"]
        return data

    def secret(self) -> dict[str, str]:
        data = self.get("Secret", SECRET)["data"]
        return {k: base64.b64decode(v).decode() for k, v in data.items()}


def render(chart: Any, values_file: str | None = "minimal-values.yaml",
           overrides: dict[str, Any] | None = None) -> Rendered:
    values = load_values(values_file) if values_file else {}
    return Rendered(chart.render(merged(values, overrides or {}), name=RELEASE, namespace=NAMESPACE))


def render_error(chart: Any, values: dict[str, Any]) -> str:
    with pytest.raises(helm.HelmError) as e:
        chart.render(values, name=RELEASE, namespace=NAMESPACE)
    return str(e.value)


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def container(obj: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in pod_spec(obj)["containers"] if c["name"] == name]
    assert len(found) == 1, f"{obj['metadata']['name']}: container {name!r}"
    return found[0]


def pod_environment(r: Rendered, c: dict[str, Any]) -> dict[str, str]:
    """The environment Kubernetes would give container `c`: the ConfigMap (envFrom), then its
    env entries in order, secretKeyRefs read from the rendered Secret and $(VAR) expanded."""
    environ = dict(r.config())
    secret = r.secret()
    for e in c["env"]:
        if "value" in e:
            environ[e["name"]] = re.sub(r"\$\(([A-Z_]+)\)", lambda m: environ[m.group(1)], e["value"])
        else:
            environ[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    return environ


def trigger(r: Rendered, kind: str) -> dict[str, Any]:
    """The GPU workers' ScaledObject trigger of type `kind` (there is one of each)."""
    triggers = r.get("ScaledObject", f"{FULLNAME}-worker-gpu")["spec"]["triggers"]
    found: list[dict[str, Any]] = [t for t in triggers if t["type"] == kind]
    assert len(found) == 1, f"{kind}: {len(found)} triggers"
    return found[0]


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


def idforge_containers(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    """(workload/container, container) for every idforge container, init containers included."""
    out = []
    for d in r.of_kind("Deployment"):
        spec = pod_spec(d)
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{d['metadata']['name']}/{c['name']}", c))
    return out


# --------------------------------------------------------------------------------------- validation

@pytest.fixture(scope="module")
def crd_validators() -> dict[tuple[str, str], jsonschema.protocols.Validator]:
    """Strict validators for the custom resources; Kubernetes types they embed resolve to
    kubernetes-validate's own (strict) definitions for K8S_VERSION."""
    defs_file = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
                 / f"v{K8S_VERSION}-local-strict" / "_definitions.json")
    defs = referencing.Resource.from_contents(json.loads(defs_file.read_text()))
    registry = defs @ referencing.Registry()
    out = {}
    for key, filename in CRD_SCHEMA_FILES.items():
        schema = json.loads((CRD_SCHEMAS / filename).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        out[key] = jsonschema.Draft202012Validator(schema, registry=registry)
    return out


def validate_object(obj: dict[str, Any], crd_validators: dict[tuple[str, str], Any]) -> None:
    key = (obj["apiVersion"], obj["kind"])
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    if key in crd_validators:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in crd_validators[key].iter_errors(obj)]
        assert not errors, f"{where}: {errors}"
        return
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{where} fails kubernetes-validate --strict ({K8S_VERSION}): "
                    f"{'.'.join(map(str, e.path))}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        pytest.fail(f"{where}: no schema: {e.message}")


def test_ci_values_files_cover_the_scenarios() -> None:
    assert {"minimal-values.yaml", "external-redis-values.yaml", "bundled-redis-values.yaml",
            "keda-values.yaml", "existing-secret-values.yaml"} <= set(VALUES_FILES)


@pytest.mark.parametrize("values_file", [None, *VALUES_FILES])
def test_lint_strict(values_file: str | None) -> None:
    """`helm lint --strict`, with the chart's defaults and with each values file. (Lint mode only
    logs `required` and `fail`; the tests below render to see those.)"""
    values = load_values(values_file) if values_file else None
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 = warning, 3 = error
    assert report["total_charts_linted"] == 1
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_manifest_passes_strict_validation(chart: Any, crd_validators: Any, values_file: str) -> None:
    r = render(chart, values_file)
    assert len(r.docs) >= 10, r.names()
    for obj in r.docs:
        assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]
        validate_object(obj, crd_validators)


def test_crd_schemas_refuse_malformed_objects(chart: Any, crd_validators: Any) -> None:
    """The vendored schemas bite: a number where KEDA wants a string, an unknown field, a bad
    Prometheus duration."""
    r = render(chart, "keda-values.yaml")
    so = r.get("ScaledObject", f"{FULLNAME}-worker-gpu")
    ta = r.get("TriggerAuthentication", f"{FULLNAME}-worker-gpu")
    sm = r.get("ServiceMonitor", f"{FULLNAME}-api")
    backlog = {"url": BACKLOG_URL, "valueLocation": "gpu.waiting", "targetValue": "2"}
    bad = [
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "redis", "metadata": {
            "address": "redis:6379", "listName": "gpu", "listLength": 3}}]}})),
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "redis", "metadata": {
            "address": "redis:6379", "listLength": "3"}}]}})),  # no listName
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "metrics-api", "metadata": {
            **backlog, "targetValue": 2}}]}})),
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "metrics-api", "metadata": {
            "url": BACKLOG_URL, "targetValue": "2"}}]}})),  # no valueLocation
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "metrics-api", "metadata": {
            **backlog, "valuelocation": "gpu.held"}}]}})),  # not a parameter
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "metrics-api", "metadata": {
            **backlog, "url": "idf-idforge-api/backlog"}}]}})),
        ("ScaledObject", merged(so, {"spec": {"triggers": [{"type": "metrics-api", "metadata": {
            **backlog, "authMode": "bearer"}}]}})),  # no authenticationRef: no token
        ("TriggerAuthentication", merged(ta, {"spec": {"secretTargetRef": [{"parameter": "token",
                                                                            "name": SECRET}]}})),  # no key
        ("TriggerAuthentication", merged(ta, {"spec": {"secretRef": [{"parameter": "token", "name": SECRET,
                                                                      "key": "IDFORGE_METRICS_TOKEN"}]}})),
        ("ScaledObject", merged(so, {"spec": {"cooldownPeriodSeconds": 300}})),
        ("ScaledObject", merged(so, {"spec": {"advanced": {"horizontalPodAutoscalerConfig": {
            "behavior": {"scaleDown": {"stabilizationWindow": 60}}}}}})),  # k8s HPA type, strict
        ("ServiceMonitor", merged(sm, {"spec": {"endpoints": [{"port": "http", "interval": "30 seconds"}]}})),
        ("ServiceMonitor", merged(sm, {"spec": {"selector": {"matchLabelz": {"a": "b"}}}})),
    ]
    for kind, obj in bad:
        key = (obj["apiVersion"], kind)
        assert list(crd_validators[key].iter_errors(obj)), f"{kind} accepted: {obj['spec']}"


# --------------------------------------------------------------------------------------- failures

@pytest.mark.parametrize("field,env_var", [
    ("apiKeys", "IDFORGE_API_KEYS"), ("secretKey", "IDFORGE_SECRET_KEY"),
    ("webhookSecret", "IDFORGE_WEBHOOK_SECRET"), ("s3AccessKeyId", "IDFORGE_S3_ACCESS_KEY_ID"),
    ("s3SecretAccessKey", "IDFORGE_S3_SECRET_ACCESS_KEY"),
])
def test_render_without_a_production_secret_fails_naming_it(chart: Any, field: str, env_var: str) -> None:
    values = load_values("minimal-values.yaml")
    del values["secrets"][field]
    message = render_error(chart, values)
    assert f"secrets.{field} is required" in message and env_var in message, message
    assert "secrets.existingSecret" in message, message


@pytest.mark.parametrize("overrides,expected", [
    ({"config": {"visibilityTimeoutSeconds": 3600, "taskTimeLimitSeconds": 3600}},
     "config.visibilityTimeoutSeconds (3600) must be larger than config.taskTimeLimitSeconds (3600)"),
    ({"config": {"taskSoftTimeLimitSeconds": 10800}},
     "config.taskSoftTimeLimitSeconds (10800) must be below config.taskTimeLimitSeconds (10800)"),
    ({"config": {"webhookBackoffMaxSeconds": 20000}},
     "config.webhookBackoffMaxSeconds (20000) must be below config.visibilityTimeoutSeconds (14400)"),
    ({"redis": {"bundled": {"enabled": True}}}, "not both"),
    ({"redis": {"external": {"url": ""}}}, "set redis.external.url (redis://host:6379/0) or redis.bundled.enabled=true"),
    ({"redis": {"external": {"url": "", "urlFromExistingSecret": True}}},
     "redis.external.urlFromExistingSecret needs secrets.existingSecret"),
    ({"secrets": {"existingSecret": "mine"}, "redis": {"external": {"url": "redis://:pw@r:6379/0"}}},
     "put IDFORGE_REDIS_URL in that Secret"),
    ({"redis": {"external": {"url": ""}, "bundled": {"enabled": True, "auth": {"enabled": True}}}},
     "redis.bundled.auth.password is required"),
    ({"keda": {"enabled": True}, "gpuWorker": {"autoscaling": {"enabled": True}}},
     "keda.enabled and gpuWorker.autoscaling.enabled both scale the GPU workers"),
    ({"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}},
     "keda.minReplicaCount (5) is above keda.maxReplicaCount (2)"),
    ({"gpuWorker": {"enabled": False}}, "leaves the gpu queue without a consumer"),
    ({"models": {"volume": {"type": "pvc"}}}, "models.volume.type=pvc needs models.volume.existingClaim"),
    ({"api": {"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}},
     "api.autoscaling.minReplicas (5) is above api.autoscaling.maxReplicas (3)"),
])
def test_contradictory_values_fail_with_a_clear_message(chart: Any, overrides: dict[str, Any],
                                                       expected: str) -> None:
    message = render_error(chart, merged(load_values("minimal-values.yaml"), overrides))
    assert expected in message, message


@pytest.mark.parametrize("overrides,expected", [
    ({"gpuWorker": {"terminationGracePeriodSeconds": "600"}}, "/gpuWorker/terminationGracePeriodSeconds"),
    ({"gpuWorker": {"terminationGracePeriodSeconds": 5}}, "minimum"),
    ({"gpuWorker": {"gpus": 2}}, "gpus"),  # no such value: one GPU per pod
    ({"keda": {"listLength": 0}}, "/keda/listLength"),
    ({"keda": {"backlog": {"targetValue": 0}}}, "/keda/backlog/targetValue"),
    ({"keda": {"backlog": {"targetValue": "2"}}}, "/keda/backlog/targetValue"),
    ({"keda": {"backlog": {"activationTargetValue": -1}}}, "/keda/backlog/activationTargetValue"),
    ({"keda": {"backlog": {"valueLocation": "gpu.held"}}}, "valueLocation"),
    ({"config": {"environment": "staging"}}, "/config/environment"),
    ({"config": {"extra": {"IDFORGE_API_KEYS": "t:k"}}}, "invalid propertyName 'IDFORGE_API_KEYS'"),
    ({"config": {"extra": {"IDFORGE_MAX_CONCURRENT_JOBS": 64}}}, "/config/extra/IDFORGE_MAX_CONCURRENT_JOBS"),
    ({"config": {"extra": {"IDFORGE_MAX_CONCURENT_JOBS": "64"}}}, "invalid propertyName 'IDFORGE_MAX_CONCURENT_JOBS'"),
    ({"config": {"extra": {"IDFORGE_LOG_LEVEL": "DEBUG"}}}, "invalid propertyName 'IDFORGE_LOG_LEVEL'"),
    ({"secrets": {"webhookSecret": "not-a-whsec"}}, "/secrets/webhookSecret"),
    ({"secrets": {"secretKey": "changeme"}}, "/secrets/secretKey"),
    ({"redis": {"external": {"url": "http://redis:6379"}}}, "/redis/external/url"),
    ({"cpuWorker": {"queues": "gpu"}}, "/cpuWorker/queues"),
    ({"models": {"registry": {"models": {"arc2face": {"sha256": {"unet.safetensors": "abc"}}}}}},
     "/models/registry/models/arc2face/sha256"),
    ({"api": {"ingress": {"hosts": [{"host": "x.example", "paths": [{"path": "/", "pathType": "Glob"}]}]}}},
     "pathType"),
])
def test_schema_refuses_bad_values(chart: Any, overrides: dict[str, Any], expected: str) -> None:
    values = merged(load_values("minimal-values.yaml"), overrides)
    with pytest.raises(helm.HelmValuesError) as e:
        chart.validate_schema(values)
    assert expected in str(e.value), str(e.value)
    assert "schema" in render_error(chart, values)


def test_a_bad_values_file_is_refused_by_lint_and_render(chart: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad-values.yaml"
    bad.write_text((CI_VALUES / "minimal-values.yaml").read_text()
                   + "gpuWorker:\n  terminationGracePeriodSeconds: ten minutes\nkeda:\n  enabled: yes-please\n")
    values = helm.values_from_yaml(bad.read_text())  # Helm's own reading of a -f file
    message = render_error(chart, values)
    assert "/gpuWorker/terminationGracePeriodSeconds" in message and "/keda/enabled" in message, message
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
    assert report["errors"], report


# --------------------------------------------------------------------------------------- API

def test_api_serves_with_probes_on_healthz_and_readyz(chart: Any) -> None:
    r = render(chart)
    deploy = r.get("Deployment", f"{FULLNAME}-api")
    api = container(deploy, "api")
    assert [api["command"], api["args"]] == [["idforge"], ["serve", "--host", "0.0.0.0", "--port", "8000"]]
    assert api["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert api["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert api["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert api["resources"]["requests"] and api["resources"]["limits"]["memory"]
    assert deploy["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    service = r.get("Service", f"{FULLNAME}-api")
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_api_hpa_and_pdb(chart: Any) -> None:
    r = render(chart)
    deploy = r.get("Deployment", f"{FULLNAME}-api")
    assert "replicas" not in deploy["spec"], "the HPA owns the replica count"
    hpa = r.get("HorizontalPodAutoscaler", f"{FULLNAME}-api")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": f"{FULLNAME}-api"}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    pdb = r.get("PodDisruptionBudget", f"{FULLNAME}-api")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "api"

    fixed = render(chart, overrides={"api": {"autoscaling": {"enabled": False}, "replicas": 3}})
    assert fixed.get("Deployment", f"{FULLNAME}-api")["spec"]["replicas"] == 3
    assert not fixed.has("HorizontalPodAutoscaler", f"{FULLNAME}-api")


def test_ingress_and_public_url(chart: Any) -> None:
    r = render(chart, "keda-values.yaml")
    ing = r.get("Ingress", f"{FULLNAME}-api")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "idforge-tls", "hosts": ["idforge.example.com"]}]
    (rule,) = ing["spec"]["rules"]
    assert rule["host"] == "idforge.example.com"
    (path,) = rule["http"]["paths"]
    assert path["backend"] == {"service": {"name": f"{FULLNAME}-api", "port": {"name": "http"}}}
    assert r.config()["IDFORGE_PUBLIC_URL"] == "https://idforge.example.com"
    assert not render(chart).has("Ingress", f"{FULLNAME}-api")
    assert render(chart).config()["IDFORGE_PUBLIC_URL"] == f"http://{FULLNAME}-api.{NAMESPACE}.svc:80"


def test_service_monitor_scrapes_metrics_with_the_token_from_the_secret(chart: Any) -> None:
    r = render(chart, "keda-values.yaml")
    sm = r.get("ServiceMonitor", f"{FULLNAME}-api")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    service = r.get("Service", f"{FULLNAME}-api")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert (ep["port"], ep["path"]) == ("http", "/metrics")
    assert ep["authorization"] == {"type": "Bearer",
                                   "credentials": {"name": SECRET, "key": "IDFORGE_METRICS_TOKEN"}}
    assert r.secret()["IDFORGE_METRICS_TOKEN"] == "test-only-metrics-token"
    api_env = env_of(container(r.get("Deployment", f"{FULLNAME}-api"), "api"))
    assert api_env["IDFORGE_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET, "key": "IDFORGE_METRICS_TOKEN"}
    # No token: an open scrape, no authorization block, no env var.
    plain = render(chart, overrides={"api": {"serviceMonitor": {"enabled": True}}})
    (ep,) = plain.get("ServiceMonitor", f"{FULLNAME}-api")["spec"]["endpoints"]
    assert "authorization" not in ep
    assert "IDFORGE_METRICS_TOKEN" not in env_of(container(plain.get("Deployment", f"{FULLNAME}-api"), "api"))
    assert not render(chart).of_kind("ServiceMonitor")


# --------------------------------------------------------------------------------------- workers

def test_gpu_worker_one_process_one_gpu(chart: Any) -> None:
    r = render(chart)
    deploy = r.get("Deployment", f"{FULLNAME}-worker-gpu")
    spec = pod_spec(deploy)
    worker = container(deploy, "worker")
    assert worker["image"] == "idforge/worker-gpu:0.1.0"
    assert [worker["command"], worker["args"]] == [["idforge"], ["worker", "--queues", "gpu", "--concurrency", "1"]]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["resources"]["requests"]["cpu"] and worker["resources"]["limits"]["memory"] == "48Gi"
    env = env_of(worker)
    assert env["IDFORGE_DEVICE"]["value"] == "cuda"
    assert "REMAP_SIGTERM" not in env, "SIGTERM must stay Celery's warm shutdown"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["terminationGracePeriodSeconds"] == 1800
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    pdb = r.get("PodDisruptionBudget", f"{FULLNAME}-worker-gpu")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert not r.has("HorizontalPodAutoscaler", f"{FULLNAME}-worker-gpu")


def test_gpu_worker_placement_and_grace_come_from_values(chart: Any) -> None:
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "gpu-type", "operator": "In", "values": ["h100", "a100"]}]}]}}}
    tolerations = [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    r = render(chart, overrides={"gpuWorker": {
        "nodeSelector": {"cloud.example/accelerator": "h100"}, "tolerations": tolerations,
        "affinity": affinity, "terminationGracePeriodSeconds": 3600,
        "resources": {"limits": {"nvidia.com/gpu": 4, "memory": "80Gi"}}}})
    spec = pod_spec(r.get("Deployment", f"{FULLNAME}-worker-gpu"))
    assert spec["nodeSelector"] == {"cloud.example/accelerator": "h100", "nvidia.com/gpu.present": "true"}
    assert spec["tolerations"] == tolerations
    assert spec["affinity"] == affinity
    assert spec["terminationGracePeriodSeconds"] == 3600
    limits = container(r.get("Deployment", f"{FULLNAME}-worker-gpu"), "worker")["resources"]["limits"]
    assert limits == {"nvidia.com/gpu": 1, "memory": "80Gi"}, "one worker process per GPU, always"


def test_cpu_worker_consumes_the_cpu_queue(chart: Any) -> None:
    r = render(chart)
    deploy = r.get("Deployment", f"{FULLNAME}-worker-cpu")
    worker = container(deploy, "worker")
    assert worker["image"] == "idforge/worker-cpu:0.1.0"
    assert worker["args"] == ["worker", "--queues", "cpu", "--concurrency", "2"]
    assert env_of(worker)["IDFORGE_DEVICE"]["value"] == "cpu"
    assert "nvidia.com/gpu" not in worker["resources"].get("limits", {})
    assert pod_spec(deploy)["terminationGracePeriodSeconds"] == 600
    volumes = {v["name"]: v for v in pod_spec(deploy)["volumes"]}
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "20Gi"}, "finalize streams RecordIO through /tmp"
    # Without GPU workers, the CPU worker takes both queues.
    cpu_only = render(chart, overrides={"gpuWorker": {"enabled": False}, "cpuWorker": {"queues": "gpu,cpu"}})
    assert not cpu_only.has("Deployment", f"{FULLNAME}-worker-gpu")
    assert not cpu_only.has("PodDisruptionBudget", f"{FULLNAME}-worker-gpu")
    assert container(cpu_only.get("Deployment", f"{FULLNAME}-worker-cpu"), "worker")["args"][2] == "gpu,cpu"


def test_gpu_worker_hpa_without_keda(chart: Any) -> None:
    r = render(chart, overrides={"gpuWorker": {"autoscaling": {"enabled": True}}})
    assert "replicas" not in r.get("Deployment", f"{FULLNAME}-worker-gpu")["spec"]
    hpa = r.get("HorizontalPodAutoscaler", f"{FULLNAME}-worker-gpu")
    assert hpa["spec"]["scaleTargetRef"]["name"] == f"{FULLNAME}-worker-gpu"
    assert hpa["spec"]["behavior"]["scaleDown"]["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert not r.of_kind("ScaledObject")


def test_models_registry_prefetch_and_volume(chart: Any, tmp_path: Path) -> None:
    from models.registry import load_overrides

    values = load_values("external-redis-values.yaml")
    r = render(chart, "external-redis-values.yaml")
    cm = r.get("ConfigMap", f"{FULLNAME}-models")
    registry = yaml.safe_load(cm["data"]["registry.yaml"])
    assert registry == values["models"]["registry"]
    path = tmp_path / "registry.yaml"
    path.write_text(cm["data"]["registry.yaml"])
    specs = load_overrides(path)  # the workers' own reading of the file: pins and location accepted
    assert specs["arcface-r100"].location == "s3://ml-weights/arcface-r100/"
    assert r.config()["IDFORGE_MODEL_REGISTRY"] == "/etc/idforge/registry.yaml"
    assert r.config()["IDFORGE_MODEL_DIR"] == "/models"
    for name in ("worker-gpu", "worker-cpu"):
        deploy = r.get("Deployment", f"{FULLNAME}-{name}")
        spec = pod_spec(deploy)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"] == {"name": "models", "persistentVolumeClaim": {"claimName": "idforge-models"}}
        assert volumes["model-registry"]["configMap"]["name"] == f"{FULLNAME}-models"
        (init,) = spec["initContainers"]
        assert [init["command"], init["args"]] == [["idforge"], ["models", "verify", "arcface-r100"]]
        assert init["image"] == container(deploy, "worker")["image"]
        for c in (init, container(deploy, "worker")):
            mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
            assert mounts["models"] == "/models" and mounts["model-registry"] == "/etc/idforge"
    # Defaults: a per-pod emptyDir, no registry, no init container.
    plain = render(chart)
    spec = pod_spec(plain.get("Deployment", f"{FULLNAME}-worker-gpu"))
    assert next(v for v in spec["volumes"] if v["name"] == "models")["emptyDir"] == {"sizeLimit": "50Gi"}
    assert "initContainers" not in spec and not plain.has("ConfigMap", f"{FULLNAME}-models")
    assert plain.config()["IDFORGE_MODEL_REGISTRY"] == ""


# --------------------------------------------------------------------------------------- config and secrets

def test_secrets_come_from_the_secret_and_settings_from_the_configmap(chart: Any) -> None:
    values = load_values("minimal-values.yaml")
    r = render(chart)
    secret = r.secret()
    assert secret["IDFORGE_API_KEYS"] == values["secrets"]["apiKeys"]
    assert secret["IDFORGE_S3_SECRET_ACCESS_KEY"] == values["secrets"]["s3SecretAccessKey"]
    config = r.config()
    assert not set(SECRET_SETTINGS) & set(config), "secrets leaked into the ConfigMap"
    assert config["IDFORGE_ENVIRONMENT"] == "production" and config["IDFORGE_STORAGE"] == "s3"
    containers = idforge_containers(r)
    assert {name for name, _ in containers} == {f"{FULLNAME}-api/api", f"{FULLNAME}-worker-gpu/worker",
                                                f"{FULLNAME}-worker-cpu/worker"}
    for name, c in containers:
        assert c["envFrom"] == [{"configMapRef": {"name": FULLNAME}}], name
        env = env_of(c)
        for key in REQUIRED_SECRET_KEYS:
            assert env[key]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": key}, (name, key)
        assert "value" not in env[key]


@pytest.mark.parametrize("values_file,redis_url", [
    ("minimal-values.yaml", "redis://redis.data.svc:6379/0"),
    ("external-redis-values.yaml", "rediss://:test-only-redis-pw@redis.example.internal:6380/2"),
    ("bundled-redis-values.yaml", f"redis://:test-only-redis-password@{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"),
    ("keda-values.yaml", "redis://:test-only-redis-pw@redis.data.svc:6379/1"),
])
def test_rendered_settings_pass_the_services_own_validation(chart: Any, monkeypatch: pytest.MonkeyPatch,
                                                             values_file: str, redis_url: str) -> None:
    """What each idforge container's environment would hold (the ConfigMap, then its env with
    secrets from the Secret and $(VAR) expanded) is accepted by app.settings.Settings in
    production mode, and names only real settings."""
    r = render(chart, values_file)
    for name, c in idforge_containers(r):
        environ = pod_environment(r, c)
        unknown = [k for k in environ if k.startswith("IDFORGE_")
                   and k.removeprefix("IDFORGE_").lower() not in Settings.model_fields]
        assert not unknown, f"{name}: not settings: {unknown}"
        for key in [k for k in os.environ if k.startswith("IDFORGE_")]:
            monkeypatch.delenv(key)
        for key, value in environ.items():
            monkeypatch.setenv(key, value)
        s = Settings()
        assert (s.environment, s.storage, s.redis_url) == ("production", "s3", redis_url), name
        assert s.visibility_timeout_s > (s.task_time_limit_s or 0), name
        assert s.key_entries and s.webhook_keys and s.s3_secret_access_key.get_secret_value(), name


def test_config_extra_accepts_exactly_the_settings_the_chart_leaves_open(chart: Any) -> None:
    """config.extra's allowed names (values.schema.json) are every IDFORGE_* setting of
    app/settings.py except the secrets, the Redis/broker URLs, local storage and what the ConfigMap
    already writes: a new setting needs adding there, a removed one dropping."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(schema["properties"]["config"]["properties"]["extra"]["propertyNames"]["enum"])
    every = {f"IDFORGE_{name.upper()}" for name in Settings.model_fields}
    written = set(render(chart).config())
    left_open = every - set(SECRET_SETTINGS) - written - {
        "IDFORGE_REDIS_URL", "IDFORGE_BROKER_URL", "IDFORGE_STORAGE_DIR", "IDFORGE_DEVICE"}
    assert allowed == left_open, (f"add to config.extra's enum: {sorted(left_open - allowed)}; "
                                  f"remove: {sorted(allowed - left_open)}")
    r = render(chart, overrides={"config": {"extra": {"IDFORGE_MAX_CONCURRENT_JOBS": "64"}}})
    assert r.config()["IDFORGE_MAX_CONCURRENT_JOBS"] == "64"


def test_redis_url_in_the_secret_only_when_it_has_a_password(chart: Any) -> None:
    plain = render(chart)
    assert plain.config()["IDFORGE_REDIS_URL"] == "redis://redis.data.svc:6379/0"
    assert "IDFORGE_REDIS_URL" not in plain.secret()
    assert "IDFORGE_REDIS_URL" not in env_of(container(plain.get("Deployment", f"{FULLNAME}-api"), "api"))

    with_pw = render(chart, "external-redis-values.yaml")
    assert "IDFORGE_REDIS_URL" not in with_pw.config()
    assert with_pw.secret()["IDFORGE_REDIS_URL"] == "rediss://:test-only-redis-pw@redis.example.internal:6380/2"
    for name, c in idforge_containers(with_pw):
        assert env_of(c)["IDFORGE_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
            "name": SECRET, "key": "IDFORGE_REDIS_URL"}, name
    assert not any("test-only-redis-pw" in text for path, text in with_pw.files.items()
                   if not path.endswith("secret.yaml")), "the password leaked outside the Secret"


def test_existing_secret(chart: Any) -> None:
    r = render(chart, "existing-secret-values.yaml")
    assert not r.of_kind("Secret"), "no Secret is made when existingSecret is given"
    assert "IDFORGE_REDIS_URL" not in r.config()
    for name, c in idforge_containers(r):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
        assert {ref["name"] for ref in refs.values()} == {"idforge-prod"}, name
        assert set(REQUIRED_SECRET_KEYS) | {"IDFORGE_REDIS_URL", "IDFORGE_METRICS_TOKEN", "REDIS_PASSWORD"} \
            == set(refs), name
    (ep,) = r.get("ServiceMonitor", f"{FULLNAME}-api")["spec"]["endpoints"]
    assert ep["authorization"]["credentials"] == {"name": "idforge-prod", "key": "IDFORGE_METRICS_TOKEN"}
    queue = trigger(r, "redis")
    assert queue["metadata"]["address"] == "redis-master.data.svc:6379"
    assert queue["metadata"]["passwordFromEnv"] == "REDIS_PASSWORD"
    # KEDA authenticates to /backlog with the token from the same Secret.
    backlog = trigger(r, "metrics-api")
    assert backlog["metadata"]["authMode"] == "bearer"
    ta = r.get("TriggerAuthentication", backlog["authenticationRef"]["name"])
    assert ta["spec"] == {"secretTargetRef": [
        {"parameter": "token", "name": "idforge-prod", "key": "IDFORGE_METRICS_TOKEN"}]}


def test_checksum_annotations_roll_pods_on_config_change(chart: Any) -> None:
    base = render(chart)
    workloads = ("api", "worker-gpu", "worker-cpu")

    def annotations(r: Rendered, name: str) -> dict[str, str]:
        meta: dict[str, str] = r.get("Deployment", f"{FULLNAME}-{name}")["spec"]["template"]["metadata"]["annotations"]
        return meta

    config_hash = hashlib.sha256(base.files["idforge/templates/configmap.yaml"].encode()).hexdigest()
    secret_hash = hashlib.sha256(base.files["idforge/templates/secret.yaml"].encode()).hexdigest()
    for name in workloads:
        assert annotations(base, name)["checksum/config"] == config_hash, name
        assert annotations(base, name)["checksum/secret"] == secret_hash, name
    config_changed = render(chart, overrides={"config": {"logLevel": "DEBUG"}})
    secret_changed = render(chart, overrides={"secrets": {"secretKey": "test-only-rotated-key-0123456789"}})
    for name in workloads:
        before = annotations(base, name)
        assert annotations(config_changed, name)["checksum/config"] != before["checksum/config"], name
        assert annotations(config_changed, name)["checksum/secret"] == before["checksum/secret"], name
        assert annotations(secret_changed, name)["checksum/secret"] != before["checksum/secret"], name
    assert render(chart).get("Deployment", f"{FULLNAME}-api")["spec"]["template"] == \
        base.get("Deployment", f"{FULLNAME}-api")["spec"]["template"], "renders are deterministic"


def test_security_context_and_resources_everywhere(chart: Any) -> None:
    for values_file in ("external-redis-values.yaml", "bundled-redis-values.yaml"):
        r = render(chart, values_file)
        for workload in r.of_kind("Deployment") + r.of_kind("StatefulSet"):
            name = workload["metadata"]["name"]
            spec = pod_spec(workload)
            assert spec["securityContext"]["runAsNonRoot"] is True, name
            assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
            assert spec["automountServiceAccountToken"] is False, name
            tmp = [v for v in spec["volumes"] if v["name"] == "tmp"]
            assert tmp and "emptyDir" in tmp[0], name
            for c in spec.get("initContainers", []) + spec["containers"]:
                where = f"{name}/{c['name']}"
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False, where
                assert sc["readOnlyRootFilesystem"] is True, where
                assert sc["capabilities"]["drop"] == ["ALL"], where
                assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
                assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], where
                assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where


# --------------------------------------------------------------------------------------- Redis

def test_bundled_redis_statefulset_with_aof(chart: Any) -> None:
    r = render(chart, "bundled-redis-values.yaml")
    sts = r.get("StatefulSet", f"{FULLNAME}-redis")
    redis = container(sts, "redis")
    args = redis["args"]

    def arg(flag: str) -> str:
        return str(args[args.index(flag) + 1])

    assert redis["command"] == ["redis-server"]
    assert (arg("--appendonly"), arg("--appendfsync"), arg("--dir")) == ("yes", "everysec", "/data")
    assert arg("--maxmemory-policy") == "noeviction"
    assert arg("--requirepass") == "$(REDIS_PASSWORD)"
    env = env_of(redis)
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "REDIS_PASSWORD"}
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]["key"] == "REDIS_PASSWORD"
    assert r.secret()["REDIS_PASSWORD"] == "test-only-redis-password"
    assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
    service = r.get("Service", f"{FULLNAME}-redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert r.get("Service", sts["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    # The idforge pods splice the password into the URL at start (Kubernetes' $(VAR) expansion).
    for name, c in idforge_containers(r):
        names = [e["name"] for e in c["env"]]
        assert names.index("REDIS_PASSWORD") < names.index("IDFORGE_REDIS_URL"), name
        assert env_of(c)["IDFORGE_REDIS_URL"]["value"] == \
            f"redis://:$(REDIS_PASSWORD)@{FULLNAME}-redis.{NAMESPACE}.svc:6379/0", name
    # Without auth: no password anywhere, the URL in the ConfigMap.
    open_redis = render(chart, "bundled-redis-values.yaml", {"redis": {"bundled": {"auth": {"enabled": False}}}})
    assert "--requirepass" not in container(open_redis.get("StatefulSet", f"{FULLNAME}-redis"), "redis")["args"]
    assert open_redis.config()["IDFORGE_REDIS_URL"] == f"redis://{FULLNAME}-redis.{NAMESPACE}.svc:6379/0"
    assert not render(chart).of_kind("StatefulSet")


# --------------------------------------------------------------------------------------- KEDA

def test_keda_scaled_object_on_the_gpu_backlog(chart: Any) -> None:
    r = render(chart, "keda-values.yaml")
    so = r.get("ScaledObject", f"{FULLNAME}-worker-gpu")
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "name": f"{FULLNAME}-worker-gpu", "envSourceContainerName": "worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 6, 1200)
    scale_down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] == 900
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    assert [t["type"] for t in spec["triggers"]] == ["metrics-api", "redis"]
    # The backlog (held + queued shards) from the chart's API Service, with the metrics token.
    backlog = trigger(r, "metrics-api")
    assert backlog["metadata"] == {"url": BACKLOG_URL, "format": "json", "valueLocation": "gpu.waiting",
                                   "targetValue": "4", "activationTargetValue": "1", "authMode": "bearer"}
    api = r.get("Service", f"{FULLNAME}-api")
    (port,) = api["spec"]["ports"]
    assert BACKLOG_URL == f"http://{api['metadata']['name']}.{NAMESPACE}.svc:{port['port']}/backlog"
    assert backlog["authenticationRef"] == {"name": f"{FULLNAME}-worker-gpu"}
    ta = r.get("TriggerAuthentication", f"{FULLNAME}-worker-gpu")
    assert ta["metadata"]["namespace"] == so["metadata"]["namespace"]
    assert ta["spec"] == {"secretTargetRef": [
        {"parameter": "token", "name": SECRET, "key": "IDFORGE_METRICS_TOKEN"}]}
    assert r.secret()["IDFORGE_METRICS_TOKEN"] == "test-only-metrics-token"
    # The gpu list itself, straight from the broker.
    assert trigger(r, "redis")["metadata"] == {
        "address": "redis.data.svc:6379", "listName": "gpu", "listLength": "3", "activationListLength": "0",
        "databaseIndex": "1", "enableTLS": "false", "passwordFromEnv": "REDIS_PASSWORD"}
    gpu = r.get("Deployment", f"{FULLNAME}-worker-gpu")
    assert "replicas" not in gpu["spec"], "KEDA owns the replica count"
    assert env_of(container(gpu, "worker"))["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET, "key": "REDIS_PASSWORD"}
    assert r.secret()["REDIS_PASSWORD"] == "test-only-redis-pw"
    assert pod_spec(gpu)["terminationGracePeriodSeconds"] == 1200
    assert not r.has("HorizontalPodAutoscaler", f"{FULLNAME}-worker-gpu")
    default = render(chart)
    assert not default.of_kind("ScaledObject") and not default.of_kind("TriggerAuthentication")


def test_keda_backlog_trigger_without_a_metrics_token(chart: Any) -> None:
    """No metrics token: /backlog is open, so no authentication; the defaults and the Service port
    follow the values."""
    r = render(chart, "minimal-values.yaml", {"keda": {"enabled": True}, "api": {"service": {"port": 8080}}})
    backlog = trigger(r, "metrics-api")
    assert backlog["metadata"] == {"url": f"http://{FULLNAME}-api.{NAMESPACE}.svc:8080/backlog",
                                   "format": "json", "valueLocation": "gpu.waiting", "targetValue": "2",
                                   "activationTargetValue": "0"}
    assert "authenticationRef" not in backlog
    assert not r.of_kind("TriggerAuthentication")


@pytest.mark.parametrize("values_file,overrides,expected", [
    ("external-redis-values.yaml", {},
     {"address": "redis.example.internal:6380", "databaseIndex": "2", "enableTLS": "true"}),
    ("minimal-values.yaml", {"redis": {"external": {"url": "redis://queue.internal/3"}}},
     {"address": "queue.internal:6379", "databaseIndex": "3", "enableTLS": "false"}),
    ("bundled-redis-values.yaml", {},
     {"address": f"{FULLNAME}-redis.{NAMESPACE}.svc:6379", "databaseIndex": "0", "enableTLS": "false"}),
])
def test_keda_trigger_follows_the_redis_url(chart: Any, values_file: str, overrides: dict[str, Any],
                                            expected: dict[str, str]) -> None:
    r = render(chart, values_file, merged({"keda": {"enabled": True}}, overrides))
    queue = trigger(r, "redis")
    assert expected.items() <= queue["metadata"].items(), queue["metadata"]
    has_password = values_file != "minimal-values.yaml"
    assert ("passwordFromEnv" in queue["metadata"]) == has_password


# --------------------------------------------------------------------------------------- shutdown

# What the chart's termination grace relies on, run for real: a Celery worker with the service's
# own configuration (app.queue.celery_config) and `idforge worker`'s flags, on a real redis-server.
SHUTDOWN_APP = '''
"""A Celery app configured exactly as idforge's, with one slow task on the `gpu` queue."""
import os
import time
from pathlib import Path

from celery import Celery

from app.queue import celery_config
from app.settings import Settings

app = Celery("helm-shutdown-check", set_as_current=False)
app.conf.update(celery_config(Settings()))
app.conf.task_routes = {"helmcheck.slow": {"queue": "gpu"}}


@app.task(name="helmcheck.slow")
def slow(marker_dir: str, seconds: float) -> None:
    d = Path(marker_dir)
    first = not any(d.glob("started-*"))
    (d / f"started-{os.getpid()}-{time.monotonic_ns()}").touch()
    time.sleep(seconds if first else 0.1)  # a redelivery finishes at once
    (d / "done").touch()
'''


class ShutdownCheck:
    """Workers (each in its own session, like a container's processes) and a client."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        (tmp_path / "helm_shutdown_app.py").write_text(SHUTDOWN_APP)
        self.dir, self.markers = tmp_path, tmp_path / "markers"
        self.markers.mkdir()
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IDFORGE_")}
        self.env.update({"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}", "IDFORGE_REDIS_URL": redis_url,
                         "IDFORGE_VISIBILITY_TIMEOUT_S": "10", "IDFORGE_WEBHOOK_BACKOFF_MAX_S": "5",
                         "IDFORGE_TASK_TIME_LIMIT_S": "none"})
        self.procs: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        # The arguments `idforge worker --queues gpu --concurrency 1` hands to Celery (workers/cli.py).
        cmd = [sys.executable, "-m", "celery", "-A", "helm_shutdown_app", "worker", "-Q", "gpu", "-c", "1",
               "--pool", "prefork", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
               "--without-heartbeat"]
        with open(self.dir / f"worker-{len(self.procs)}.log", "wb") as log:  # the child keeps its copy
            proc = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def send_slow(self, seconds: float) -> None:
        client = Celery("helm-shutdown-client", set_as_current=False)
        client.conf.update(celery_config(Settings(redis_url=self.env["IDFORGE_REDIS_URL"],
                                                  visibility_timeout_s=10, webhook_backoff_max_s=5)))
        client.send_task("helmcheck.slow", args=[str(self.markers), seconds], queue="gpu")

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in self.dir.glob("worker-*.log"))
                pytest.fail(f"timed out waiting for {what}\n{logs}")
            time.sleep(0.1)

    def started(self) -> int:
        return len(list(self.markers.glob("started-*")))

    def done(self) -> bool:
        return (self.markers / "done").exists()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.mark.integration
def test_sigterm_finishes_the_task_and_a_killed_task_is_redelivered(tmp_path: Path,
                                                                   redis_server: Any) -> None:
    """SIGTERM (what Kubernetes sends first) lets the task in hand finish and exits cleanly; a
    SIGKILL of every process mid-task (the end of the grace period) leaves the message
    unacknowledged, and Redis delivers it again after the visibility timeout."""
    r = redis.Redis.from_url(redis_server.url)
    r.flushdb()
    check = ShutdownCheck(tmp_path, redis_server.url)
    try:
        worker = check.start_worker()
        check.send_slow(3.0)
        check.wait_for("the task to start", lambda: check.started() == 1, 60)
        os.kill(worker.pid, signal.SIGTERM)  # the container's main process only, as the kubelet does
        assert worker.wait(30) == 0, "warm shutdown exits 0"
        assert check.done(), "the task in hand finished after SIGTERM"
        assert check.started() == 1
        assert r.llen("gpu") == 0 and r.hlen("unacked") == 0, "the finished task was acknowledged"

        (check.markers / "done").unlink()
        for f in check.markers.glob("started-*"):
            f.unlink()
        doomed = check.start_worker()
        check.send_slow(120.0)
        check.wait_for("the second task to start", lambda: check.started() == 1, 60)
        os.killpg(doomed.pid, signal.SIGKILL)  # the grace period ran out: every process dies
        doomed.wait(10)
        assert not check.done() and r.hlen("unacked") == 1, "the cut-off task stays unacknowledged"
        check.start_worker()
        check.wait_for("the redelivered task to finish", check.done, 60)
        assert check.started() == 2
    finally:
        check.stop_all()
