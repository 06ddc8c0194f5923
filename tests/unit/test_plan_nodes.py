"""The generation plan check reasons per node and counts the nodes an autoscaler can still add."""

import pytest

from lossaverse.cluster.config import EngineConfig, RayConfig
from lossaverse.cluster.plan import PlanError, check_plan, placements
from lossaverse.cluster.ray_env import with_autoscaling
from lossaverse.pipeline.generation.generate import Competitor

NODE = {"CPU": 2.0}


def _plan(**large):
    return placements([Competitor("large", "L", engine=EngineConfig(**large)), Competitor("small", "S", engine=EngineConfig())])


def test_a_replica_bigger_than_any_node_is_refused_and_the_same_total_spread_is_accepted():
    three = [dict(NODE), dict(NODE), dict(NODE)]  # 6 CPUs, 2 per node
    with pytest.raises(PlanError, match=r"large: one replica needs \{'CPU': 4.0\} on a single node"):
        check_plan(_plan(num_cpus=4), three)  # 4 + 1 + 1 = 6 CPUs: the total fits
    check_plan(_plan(num_cpus=2, concurrency=2), three)  # the same 4 CPUs as two replicas of 2


def test_totals_that_fit_but_fragment_over_nodes_are_refused_with_what_fits():
    """Nodes of 3 CPUs hold one 2-CPU replica each: the fourth has 1 CPU left on every node."""
    plan = placements([Competitor("large", "L", engine=EngineConfig(num_cpus=2, concurrency=3)),
                       Competitor("small", "S", engine=EngineConfig(num_cpus=2))])
    nodes = [{"CPU": 3.0}] * 3  # 9 CPUs; the plan needs 3 x 2 + 2 + 1 (Ray Data) = 9
    with pytest.raises(PlanError, match=r"although its total fits: small: 0 of 1 replica\(s\) of \{'CPU': 2.0\} on one node"):
        check_plan(plan, nodes)
    check_plan(plan, nodes + [{"CPU": 2.0}])


def test_strict_spread_needs_as_many_nodes_as_bundles():
    plan = _plan(num_cpus=1, tensor_parallel_size=3, placement_strategy="STRICT_SPREAD")
    with pytest.raises(PlanError, match="on distinct nodes fit"):
        check_plan(plan, [{"CPU": 8.0}, {"CPU": 8.0}])
    check_plan(plan, [{"CPU": 2.0}, {"CPU": 2.0}, {"CPU": 2.0}])


def test_custom_resources_pin_replicas_to_the_nodes_that_have_them():
    plan = _plan(resources={"gen_large": 1})
    with pytest.raises(PlanError, match="no node has it"):
        check_plan(plan, [dict(NODE), dict(NODE)])
    check_plan(plan, [dict(NODE), {"CPU": 2.0, "gen_large": 1.0}])
    assert plan[0].bundle == {"CPU": 1.0, "gen_large": 1.0}


def test_nodes_the_autoscaler_can_add_count_and_the_alive_ones_of_a_type_are_not_counted_twice():
    head = {"CPU": 1.0, "head": 1.0}
    worker = {"CPU": 2.0, "gen": 1.0}
    groups = [{"name": "cpu2", "resources": worker, "max": 3}]
    plan = _plan(num_cpus=2, concurrency=2, resources={"gen": 1})
    with pytest.raises(PlanError):
        check_plan(plan, [head])  # the head alone
    nodes = with_autoscaling([head, dict(worker)], groups)
    assert len(nodes) == 4 and sum(1 for n in nodes if n.get("pending")) == 2
    check_plan(plan, with_autoscaling([head], groups))
    with pytest.raises(PlanError):
        check_plan(_plan(num_cpus=2, concurrency=4, resources={"gen": 1}), with_autoscaling([head], groups))


def test_declared_node_types_validate():
    cfg = RayConfig(node_types={"cpu2": {"resources": {"CPU": 2, "gen": 1}, "max_workers": 2}})
    assert cfg.node_types["cpu2"].max_workers == 2
    with pytest.raises(ValueError, match="max_workers"):
        RayConfig(node_types={"cpu2": {"resources": {"CPU": 2}}})
