"""The manifests in deploy/kubernetes (Kustomize), deploy/kserve and deploy/ray.

Every complete built-in resource is validated against the Kubernetes API schemas (``kubernetes-validate``, strict:
unknown fields fail); custom resources (ServiceMonitor, KServe, KubeRay) are checked for the fields ModelDock
relies on. Each overlay is rendered with ``kubectl kustomize`` where kubectl exists and the rendered objects are
validated too; where it does not, every reference a kustomization makes is still checked to resolve.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
KUBERNETES_VERSION = "1.30.0"
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
CUSTOM_KINDS = {"ServiceMonitor", "ClusterServingRuntime", "InferenceService", "RayCluster"}
OVERLAYS = ["base", "overlays/cpu", "overlays/gpu"]


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def kustomizations() -> list[Path]:
    return sorted(KUBERNETES.rglob("kustomization.yaml"))


def patch_files() -> set[Path]:
    """Files kustomizations use as patches: partial objects, complete only once merged."""
    patches = set()
    for kustomization in kustomizations():
        for patch in documents(kustomization)[0].get("patches", []):
            patches.add((kustomization.parent / patch["path"]).resolve())
    return patches


def complete_resources() -> list[tuple[Path, dict[str, Any]]]:
    """Every object in deploy/ meant to be applied as written (not a kustomization, a patch or Helm values)."""
    found = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        if path.resolve() in patch_files():
            continue
        for document in documents(path):
            if "kind" in document and document["kind"] not in KUSTOMIZE_KINDS:
                found.append((path, document))
    return found


def validate(document: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    except jsonschema.ValidationError as exc:  # kubernetes-validate lets jsonschema's own error through
        pytest.fail(f"{where}: {document['kind']} {document['metadata']['name']}: {exc.message} at {list(exc.path)}")


def serve_options() -> set[str]:
    """The options ``modeldock serve`` accepts, from its own --help."""
    result = subprocess.run(
        [sys.executable, "-m", "server", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    return set(re.findall(r"(--[a-z][a-z-]+)", result.stdout))


def assert_serve_args(args: list[str], options: set[str]) -> None:
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"modeldock serve has no option {arg}"


def test_built_in_resources_match_the_kubernetes_schemas() -> None:
    kinds = set()
    for path, document in complete_resources():
        if document["kind"] in CUSTOM_KINDS:
            continue
        validate(document, str(path.relative_to(ROOT)))
        kinds.add(document["kind"])
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"} <= kinds


def test_custom_resources_are_the_expected_kinds_with_names() -> None:
    custom = {d["kind"]: d for _, d in complete_resources() if d["kind"] in CUSTOM_KINDS}
    assert set(custom) == CUSTOM_KINDS
    for document in custom.values():
        assert document["apiVersion"].count("/") == 1 and document["metadata"]["name"]


def test_kustomization_references_resolve() -> None:
    base_objects = {(d["kind"], d["metadata"]["name"]) for p, d in complete_resources() if "base" in p.parts}
    for kustomization in kustomizations():
        spec = documents(kustomization)[0]
        folder = kustomization.parent
        for resource in spec.get("resources", []):
            target = (folder / resource).resolve()
            assert target.exists(), f"{kustomization}: resource {resource} does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists()
        for component in spec.get("components", []):
            component_file = folder / component / "kustomization.yaml"
            assert documents(component_file)[0]["kind"] == "Component", f"{component} is not a Component"
        for patch in spec.get("patches", []):
            [document] = documents(folder / patch["path"])
            # A patch finds its object by kind and name; a typo there would add a stray object instead.
            assert (document["kind"], document["metadata"]["name"]) in base_objects, f"{patch['path']} patches nothing"


def test_grace_period_covers_the_shutdown_timeout_and_pre_stop_pause() -> None:
    [deployment] = [d for p, d in complete_resources() if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    timeout = next(int(a.split("=")[1]) for a in container["args"] if a.startswith("--shutdown-timeout="))
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= timeout + pause + 5
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert_serve_args(container["args"], serve_options())


def test_kserve_runtime_serves_the_inference_service() -> None:
    [runtime] = documents(DEPLOY / "kserve" / "clusterservingruntime.yaml")
    [service] = documents(DEPLOY / "kserve" / "inferenceservice.yaml")
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    args = container["args"]
    assert args[0] == "serve" and "--model-repository=/mnt/models" in args
    assert f"--http-port={container['ports'][0]['containerPort']}" in args
    assert_serve_args(args, serve_options())
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]


def test_ray_cluster_runs_the_server_as_a_driver_on_the_head() -> None:
    cluster, service = documents(DEPLOY / "ray" / "raycluster.yaml")
    validate(service, "deploy/ray/raycluster.yaml")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    containers = {c["name"]: c for c in head["containers"]}
    server = containers["modeldock"]
    assert any(a.startswith("--ray") for a in server["args"])
    assert_serve_args(server["args"], serve_options())
    # The server finds the head's raylet through the session folder they share.
    mounts = {c: {m["mountPath"] for m in containers[c]["volumeMounts"]} for c in containers}
    assert "/tmp/ray" in mounts["ray-head"] & mounts["modeldock"]
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}
    gpu_group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    [gpu_worker] = gpu_group["template"]["spec"]["containers"]
    assert gpu_worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed; the references and each file are still checked above")
    return found


def render(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / overlay)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_matches_the_kubernetes_schemas(overlay: str) -> None:
    objects = render(overlay)
    for document in objects.values():
        if document["kind"] not in CUSTOM_KINDS:
            validate(document, f"kubectl kustomize {overlay}")
    deployment = objects[("Deployment", "modeldock")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    # Every selector (Service, PodDisruptionBudget, ServiceMonitor) picks the Deployment's pods.
    assert objects[("Service", "modeldock")]["spec"]["selector"].items() <= labels.items()
    assert objects[("PodDisruptionBudget", "modeldock")]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_rendered_cpu_overlay_mounts_the_claim_and_is_monitored() -> None:
    objects = render("overlays/cpu")
    pod = objects[("Deployment", "modeldock")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert {"/models", "/tmp"} == {m["mountPath"] for m in container["volumeMounts"]}
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["modeldock-models"] and ("PersistentVolumeClaim", "modeldock-models") in objects
    monitor = objects[("ServiceMonitor", "modeldock")]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= objects[("Service", "modeldock")]["metadata"]["labels"].items()
    )
    assert objects[("HorizontalPodAutoscaler", "modeldock")]["spec"]["metrics"][0]["type"] == "Resource"


def test_rendered_gpu_overlay_asks_for_a_gpu_fetches_models_and_scales_on_queue_time() -> None:
    objects = render("overlays/gpu")
    pod = objects[("Deployment", "modeldock")]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "modeldock:cuda"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    [init] = pod["initContainers"]
    shared = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    assert {m["name"] for m in init["volumeMounts"]} <= shared
    assert any(m["mountPath"] == "/models" and m["name"] in shared for m in container["volumeMounts"])
    [metric] = objects[("HorizontalPodAutoscaler", "modeldock")]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    values = yaml.safe_load(
        (KUBERNETES / "components/queue-time-autoscaling/prometheus-adapter-values.yaml").read_text()
    )
    assert metric["pods"]["metric"]["name"] in {r["name"]["as"] for r in values["rules"]["custom"]}
