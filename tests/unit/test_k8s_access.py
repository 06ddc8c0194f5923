"""Who can reach the Ray pods, and which pods hold a service-account token, in every rendered
kustomization: Ray's dashboard/Jobs API (8265) and client port (10001) only from the namespace,
Serve's port (8000) from the cluster, and the token mounted only where the autoscaler needs it."""

import pytest

from tests.unit.test_k8s import KUSTOMIZATIONS, cluster_spec, pod_templates, ray_docs, render

RAY_POD = {"ray.io/is-ray-node": "yes"}  # the label KubeRay puts on every Ray pod


def _open_ports(policy: dict, port: int) -> list[dict]:
    """The ingress rules of `policy` that let a peer outside the namespace reach `port`."""
    rules = []
    for rule in policy["spec"].get("ingress", []):
        ports = [p.get("port") for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        peers = rule.get("from")
        if not peers or any("namespaceSelector" in p or "ipBlock" in p for p in peers):
            rules.append(rule)
    return rules


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_ray_ports_are_reachable_only_from_the_namespace_and_serve_from_the_cluster(k):
    policies = [d for d in render(k) if d["kind"] == "NetworkPolicy"]
    ray = [p for p in policies if p["spec"]["podSelector"].get("matchLabels") == RAY_POD and "Ingress" in p["spec"]["policyTypes"]]
    assert ray, f"{k}: no ingress NetworkPolicy selects the Ray pods"
    for port in (8265, 10001, 6379):
        assert not [r for p in ray for r in _open_ports(p, port)], f"{k}: port {port} is open beyond the namespace"
    assert any(_open_ports(p, 8000) for p in ray), f"{k}: Serve's port 8000 is not reachable from the cluster"


@pytest.mark.parametrize("k", KUSTOMIZATIONS)
def test_only_an_autoscaling_head_mounts_the_service_account_token(k):
    for doc in ray_docs(k):
        autoscaling = cluster_spec(doc).get("enableInTreeAutoscaling", False)
        for group, pod in pod_templates(doc):
            mounted = pod["spec"].get("automountServiceAccountToken", True)
            needs = autoscaling and group == "head"
            assert mounted is needs, f"{k} {doc['metadata']['name']}/{group}: token mounted {mounted}, needed {needs}"
