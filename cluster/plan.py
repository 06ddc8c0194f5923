"""The generation plan: which resources each competitor's replicas take, checked before any work.

Both competitors run in one Ray Data job, so their replicas must fit on the cluster at the same
time. A plan the cluster cannot satisfy is refused with a message that says what is short, instead
of Ray waiting forever for a placement group that can never be scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass

# Ray Data's own map tasks (request expansion, the union) need a CPU beside the engines.
DATA_CPUS = 1.0


class PlanError(ValueError):
    """The cluster cannot run the plan; the message says what is missing and how to fix it."""


@dataclass(frozen=True)
class Placement:
    competitor: str
    model: str
    replicas: int
    bundles_per_replica: int  # tensor_parallel_size * pipeline_parallel_size
    bundle: dict  # resources of one bundle
    strategy: str
    kind: str  # "vllm" or "endpoint"

    def total(self, resource: str) -> float:
        return self.replicas * self.bundles_per_replica * self.bundle.get(resource, 0.0)

    def describe(self) -> str:
        if self.kind == "endpoint":
            return f"{self.competitor}: endpoint {self.model}, {self.replicas} request actor(s) x {self.bundle.get('CPU', 0):g} CPU"
        res = ", ".join(f"{v:g} {k}" for k, v in self.bundle.items())
        return (f"{self.competitor}: {self.model}, {self.replicas} replica(s) x {self.bundles_per_replica} bundle(s) of "
                f"{{{res}}} ({self.strategy}) = {self.total('CPU'):g} CPU, {self.total('GPU'):g} GPU")


def placements(competitors: list) -> list[Placement]:
    """One Placement per competitor (pipeline.generate.Competitor)."""
    out = []
    for c in competitors:
        if c.endpoint is not None:
            out.append(Placement(c.name, c.endpoint.url, c.endpoint.concurrency, 1, {"CPU": 1.0}, "PACK", "endpoint"))
            continue
        e = c.engine
        bundle = {"CPU": float(e.num_cpus)}
        if e.num_gpus:
            bundle["GPU"] = float(e.num_gpus)
        out.append(Placement(c.name, c.model, e.concurrency, e.bundles_per_replica, bundle, e.placement_strategy, "vllm"))
    return out


def check_plan(plan: list[Placement], nodes: list[dict]) -> None:
    """Refuse a plan that `nodes` (each a dict of resources, e.g. {"CPU": 32, "GPU": 8}) cannot hold."""
    if not nodes:
        raise PlanError("the Ray cluster reports no alive nodes")
    have = {r: sum(n.get(r, 0.0) for n in nodes) for r in ("CPU", "GPU")}
    need = {r: sum(p.total(r) for p in plan) for r in ("CPU", "GPU")}
    need["CPU"] += DATA_CPUS
    for resource in ("GPU", "CPU"):
        if need[resource] > have[resource] + 1e-9:
            parts = "; ".join(f"{p.competitor} {p.total(resource):g}" for p in plan)
            raise PlanError(
                f"the generation plan needs {need[resource]:g} {resource} at once ({parts}"
                f"{'; Ray Data tasks 1' if resource == 'CPU' else ''}) but the cluster has {have[resource]:g}: "
                "lower `concurrency`, `tensor_parallel_size` or `num_cpus`/`num_gpus` per competitor, or add nodes"
            )
    for p in plan:
        if not any(all(n.get(k, 0.0) >= v for k, v in p.bundle.items()) for n in nodes):
            raise PlanError(f"{p.competitor}: no node can hold one bundle {p.bundle}; make the bundle smaller")
        if p.strategy == "STRICT_PACK":
            replica = {k: v * p.bundles_per_replica for k, v in p.bundle.items()}
            if not any(all(n.get(k, 0.0) >= v for k, v in replica.items()) for n in nodes):
                raise PlanError(
                    f"{p.competitor}: one replica needs {replica} on a single node (STRICT_PACK) and no node has it; "
                    "use placement_strategy PACK/SPREAD or a smaller tensor_parallel_size"
                )


def ray_nodes() -> list[dict]:
    """The resources of the alive nodes of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
