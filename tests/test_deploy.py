"""The Kubernetes manifests and the BentoCloud file, offline: every overlay renders with kubectl's
kustomize and validates against the Kubernetes schemas (kubernetes-validate); the settings they
carry are exactly the service's, with its defaults; probes, ports and metric names are the ones
the service really has."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT
from embedding_worker.config import Settings
from embedding_worker.observability import metrics

DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "keda")
K8S_VERSION = "1.32"
# read from the environment but set by platforms, or secret (API_KEY comes from a Secret)
NOT_IN_CONFIG = {"runpod_pod_id", "runpod_endpoint_id", "runpod_webhook_get_job", "hf_home",
                 "hf_hub_cache", "xdg_cache_home", "api_key",
                 "ray_address"}  # `embedding-worker bulk`'s, not the service's
# the gauge the service exports (tests/test_hardening_e2e.py reads it from a real server's /metrics)
QUEUE_METRIC = metrics.PREFIX + "queue_depth"


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "kubernetes" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    return {doc["kind"]: doc for doc in docs}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request):
    return request.param, render(request.param)


def test_every_manifest_validates_against_the_kubernetes_schemas(rendered):
    import kubernetes_validate

    overlay, docs = rendered
    kinds = sorted(doc["kind"] for doc in docs)
    expected = {"ConfigMap", "Deployment", "PodDisruptionBudget", "Service"}
    expected |= {"ScaledObject"} if overlay == "keda" else {"HorizontalPodAutoscaler"}
    assert set(kinds) == expected
    for doc in docs:
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD: no schema shipped; checked below
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_config_map_is_every_setting_with_its_default(rendered):
    config = by_kind(rendered[1])["ConfigMap"]["data"]
    knobs = {name for name in Settings.model_fields if name not in NOT_IN_CONFIG}
    assert {key.lower() for key in config} == knobs
    for key, value in config.items():  # the string the pod gets parses to the built-in default
        parsed = getattr(Settings(**{key.lower(): value}), key.lower())
        assert parsed == Settings.model_fields[key.lower()].default, key


def test_the_pod_matches_the_service_it_runs(rendered, client):
    overlay, docs = rendered
    kinds = by_kind(docs)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": Settings().port}]
    assert kinds["Service"]["spec"]["ports"][0]["targetPort"] == "http"
    assert container["envFrom"][0]["configMapRef"]["name"] == kinds["ConfigMap"]["metadata"]["name"]
    api_key = next(e for e in container["env"] if e["name"] == "API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    for probe, path in (("startupProbe", "/livez"), ("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}
        assert client.get(path).status_code == 200  # the in-process service, started and ready
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # a model download
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > Settings().request_timeout + pause
    annotations = kinds["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == str(Settings().port)
    resources = container["resources"]
    if overlay == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
    else:
        assert resources["requests"]["memory"] == "1Gi"  # above the measured peak RSS, 0.89 GB


def test_autoscaling_reads_the_metric_the_service_exports():
    assert QUEUE_METRIC == "embedding_worker_queue_depth"
    hpa = by_kind(render("cpu"))["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == QUEUE_METRIC
    assert {m["type"] for m in hpa["metrics"]} == {"Pods", "Resource"}  # CPU as the fallback
    adapter = yaml.safe_load((DEPLOY / "kubernetes/prometheus-adapter/values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC + "{") and rule["name"]["as"] == QUEUE_METRIC
    keda = by_kind(render("keda"))["ScaledObject"]["spec"]
    assert keda["scaleTargetRef"]["name"] == by_kind(render("keda"))["Deployment"]["metadata"]["name"]
    assert QUEUE_METRIC in keda["triggers"][0]["metadata"]["query"]
    assert keda["minReplicaCount"] == 0 and len(keda["triggers"]) == 2  # zero needs a wake-up


def test_the_bentocloud_file_has_the_same_settings_and_parses_as_bentoml_reads_it():
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.utils.cattr import bentoml_cattr

    config = yaml.safe_load((DEPLOY / "bentocloud/deployment.yaml").read_text())
    parsed = bentoml_cattr.structure(config, CreateDeploymentSchema)
    (service,) = parsed.services
    assert service == "InfinityEmbedding"  # the class in service.py
    scaling = parsed.services[service].scaling
    assert 1 <= scaling.min_replicas < scaling.max_replicas
    config_map = by_kind(render("cpu"))["ConfigMap"]["data"]
    assert {env.name: env.value for env in parsed.envs} == config_map


def test_the_rayjob_runs_the_bulk_command_on_valid_pods():
    """deploy/ray/rayjob.yaml (KubeRay's RayJob, a CRD without a schema here): its pod templates
    validate as Kubernetes PodTemplates, its entrypoint parses with `bulk`'s own options and
    matches the worker group, and its Ray is the bulk extra's, as the Dockerfile installs it."""
    import re
    import shlex
    import tomllib

    import kubernetes_validate

    from embedding_worker.cli import bulk_parser

    job = yaml.safe_load((DEPLOY / "ray" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    (workers,) = cluster["workerGroupSpecs"]
    for group in (cluster["headGroupSpec"], workers):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": "check"}, "template": group["template"]},
                                     K8S_VERSION, strict=True)
        (container,) = group["template"]["spec"]["containers"]
        assert container["envFrom"] == [{"configMapRef": {"name": "infinity-embedding-worker"}}]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["python", "-m", "embedding_worker", "bulk"]
    args = bulk_parser().parse_args(words[4:])
    assert args.workers == workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"]
    assert str(args.cpus_per_worker) == workers["rayStartParams"]["num-cpus"]
    assert args.id_column  # a retried job resumes
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["bulk"]
    ray = next(requirement for requirement in extra if requirement.startswith("ray"))
    low, high = re.match(r"ray\[data\]>=([\d.]+),<([\d.]+)$", ray).groups()
    assert cluster["rayVersion"].startswith(low) and not cluster["rayVersion"].startswith(high)
    dockerfile = (DEPLOY / "ray" / "Dockerfile").read_text()
    assert all(f'"{requirement}"' in dockerfile for requirement in extra)
