"""The generation plan: which resources each competitor's replicas take, checked before any work.

Both competitors run in one Ray Data job, so their replicas must fit on the cluster at the same
time. A plan the cluster cannot satisfy is refused with a message that says what is short, instead
of Ray waiting forever for a placement group that can never be scheduled.

The check reasons per node, as Ray's scheduler does: a replica is placed whole on one node (one
engine actor, or a STRICT_PACK placement group), bundle by bundle (PACK, SPREAD) or on distinct
nodes (STRICT_SPREAD), so a replica bigger than any one node is refused while the same total
spread over several nodes is accepted. On an autoscaling cluster the nodes it can still add count
too (`lossaverse.cluster.ray_env.ray_nodes`): a plan that fits its maximum, not the nodes alive now, waits for them.
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
    bundle: dict  # resources of one bundle (CPU, GPU and custom resources)
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

    def units(self) -> list[list[dict]]:
        """What the scheduler places, per replica: a list of groups, each group's resources going
        to distinct nodes. One bundle (Ray Data LLM then runs a plain actor) or STRICT_PACK: the
        replica whole on one node. STRICT_SPREAD: its bundles on distinct nodes. PACK and SPREAD:
        each bundle wherever it fits."""
        merged = {k: v * self.bundles_per_replica for k, v in self.bundle.items()}
        if self.bundles_per_replica == 1 or self.strategy == "STRICT_PACK":
            return [[merged]] * self.replicas
        if self.strategy == "STRICT_SPREAD":
            return [[dict(self.bundle)] * self.bundles_per_replica] * self.replicas
        return [[dict(self.bundle)]] * (self.replicas * self.bundles_per_replica)


def placements(competitors: list) -> list[Placement]:
    """One Placement per engine (lossaverse.pipeline.generation.generate.Competitor): one per
    competitor, and one for competitors that share an engine (a base with LoRA adapters, or whose
    weights take turns in it)."""
    out, seen = [], set()
    for c in competitors:
        if c.endpoint is not None:
            out.append(Placement(c.name, c.endpoint.url, c.endpoint.concurrency, 1, {"CPU": 1.0}, "PACK", "endpoint"))
            continue
        if c.engine_name in seen:
            continue
        seen.add(c.engine_name)
        shared = [x for x in competitors if x.endpoint is None and x.engine_name == c.engine_name]
        others = [x.name for x in shared if x.name != c.engine_name]  # the base's own (zero) adapter is not counted
        if not c.shared_engine:
            model = c.model
        elif c.reload:
            model = f"{c.model}, then the weights of {', '.join(others)} in turn"
        else:
            model = f"{c.model} + LoRA adapters for {', '.join(others)}"
        e = c.engine
        out.append(Placement(c.engine_name, model, e.concurrency, e.bundles_per_replica, e.bundle, e.placement_strategy, "vllm"))
    return out


def _fits(free: dict, need: dict) -> bool:
    return all(free.get(k, 0.0) >= v - 1e-9 for k, v in need.items())


def _take(free: dict, need: dict) -> None:
    for k, v in need.items():
        free[k] = free.get(k, 0.0) - v


def _size(unit: list[dict]) -> tuple:
    return (sum(b.get("GPU", 0.0) for b in unit), sum(b.get("CPU", 0.0) for b in unit), len(unit))


def pack(plan: list[Placement], nodes: list[dict]) -> str | None:
    """Place every replica of `plan` (and Ray Data's CPU) on `nodes`, largest first, each on the
    first node with room. Returns None when all fit, else what did not. First-fit decreasing is
    a heuristic, like the scheduler's own; it can miss a packing only in contrived cases."""
    free = [dict(n) for n in nodes]
    units = [(p.competitor, unit) for p in plan for unit in p.units()] + [("Ray Data tasks", [{"CPU": DATA_CPUS}])]
    placed: dict[str, int] = {}
    for who, unit in sorted(units, key=lambda u: _size(u[1]), reverse=True):
        used: list[int] = []
        for bundle in unit:
            slot = next((i for i, f in enumerate(free) if i not in used and _fits(f, bundle)), None)
            if slot is None:
                wanted = sum(1 for w, _ in units if w == who)
                shape = " + ".join(str(b) for b in unit)
                left = "; ".join(", ".join(f"{v:g} {k}" for k, v in f.items() if k in ("CPU", "GPU") or k in bundle) for f in free)
                return (f"{who}: {placed.get(who, 0)} of {wanted} replica(s) of {shape}"
                        f"{' on distinct nodes' if len(unit) > 1 else ' on one node'} fit; free per node then: [{left}]")
            _take(free[slot], bundle)
            used.append(slot)
        placed[who] = placed.get(who, 0) + 1
    return None


def check_plan(plan: list[Placement], nodes: list[dict]) -> None:
    """Refuse a plan that `nodes` (each a dict of one node's resources, e.g. {"CPU": 32, "GPU": 8})
    cannot hold at once."""
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
        replica = {k: v * p.bundles_per_replica for k, v in p.bundle.items()}
        if p.bundles_per_replica == 1 and not any(_fits(n, replica) for n in nodes):
            raise PlanError(f"{p.competitor}: one replica needs {replica} on a single node and no node has it; "
                            "lower `num_cpus`/`num_gpus` per replica and run more replicas instead, "
                            "or give a node the resources it names")
        if not any(_fits(n, p.bundle) for n in nodes):
            raise PlanError(f"{p.competitor}: no node can hold one bundle {p.bundle}; make the bundle smaller "
                            "or give a node the resources it names")
        if p.strategy == "STRICT_PACK" and not any(_fits(n, replica) for n in nodes):
            raise PlanError(
                f"{p.competitor}: one replica needs {replica} on a single node (STRICT_PACK) and no node has it; "
                "use placement_strategy PACK/SPREAD or a smaller tensor_parallel_size"
            )
    short = pack(plan, nodes)
    if short:
        raise PlanError(
            f"the nodes cannot hold the generation plan at once although its total fits: {short}. "
            "Lower `concurrency` or the resources per replica so that replicas fill the nodes, or add nodes"
        )
