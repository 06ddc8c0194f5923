"""Every KubeRay manifest under k8s/ against the KubeRay v1 JSON schemas (tests/schemas/kuberay)
and the operator's own rules; entrypoints must name real commands and existing configs."""

import json
import shlex
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft7Validator

from cluster.cli import app
from tests.conftest import ROOT

SCHEMAS = ROOT / "tests" / "schemas" / "kuberay"
DOCS = [(p, d) for p in sorted((ROOT / "k8s").rglob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
RAY_DOCS = [(p, d) for p, d in DOCS if d.get("apiVersion") == "ray.io/v1"]
COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands}


def _id(item):
    return f"{item[0].relative_to(ROOT)}:{item[1]['metadata']['name']}"


def test_there_are_ray_manifests():
    assert {d["kind"] for _, d in RAY_DOCS} >= {"RayJob"}


@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_manifest_matches_kuberay_schema(item):
    _, doc = item
    schema = json.loads((SCHEMAS / f"{doc['kind'].lower()}_v1.json").read_text())
    errors = sorted(Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)


def _cluster_spec(doc):
    return doc["spec"].get("rayClusterSpec") or doc["spec"].get("rayClusterConfig")


@pytest.mark.parametrize("item", RAY_DOCS, ids=_id)
def test_operator_rules(item):
    _, doc = item
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 or spec.get("suspend"):
            assert spec.get("shutdownAfterJobFinishes") is True
    cluster = _cluster_spec(doc)
    for group in cluster.get("workerGroupSpecs", []):
        assert group["groupName"] and group["template"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for pod in pods:
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        for container in pod["spec"]["containers"]:
            for env in container.get("env", []):
                assert "value" not in env or "TOKEN" not in env["name"], "secrets by reference only"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"


@pytest.mark.parametrize("item", [i for i in RAY_DOCS if i[1]["kind"] == "RayJob"], ids=_id)
def test_entrypoint_names_a_real_command_and_config(item):
    argv = shlex.split(item[1]["spec"]["entrypoint"])
    assert argv[0] == "lossaverse" and argv[1] in COMMANDS
    assert (ROOT / argv[2]).is_file(), f"entrypoint config {argv[2]} does not exist"
