"""The generation plan: resources per competitor, refused when the cluster cannot hold it."""

import pytest

from lossaverse.cluster.config import EndpointConfig, EngineConfig, load_config
from lossaverse.cluster.plan import PlanError, check_plan, placements
from lossaverse.cluster.stages import competitors_of
from lossaverse.pipeline.generation.generate import Competitor
from tests.conftest import ROOT


def _gpu(tp=1, replicas=1, strategy="PACK"):
    return EngineConfig(num_gpus=1, num_cpus=2, tensor_parallel_size=tp, concurrency=replicas, placement_strategy=strategy)


def test_totals_count_every_bundle_of_every_replica():
    plan = placements([Competitor("large", "L", engine=_gpu(tp=4, replicas=2)), Competitor("small", "S", engine=_gpu(replicas=3))])
    assert [p.total("GPU") for p in plan] == [8, 3]
    assert [p.total("CPU") for p in plan] == [16, 6]
    assert "2 replica(s) x 4 bundle(s)" in plan[0].describe()


def test_a_plan_wanting_more_gpus_than_the_cluster_has_is_refused_with_the_shortfall():
    plan = placements([Competitor("large", "L", engine=_gpu(tp=4, replicas=2)), Competitor("small", "S", engine=_gpu(replicas=2))])
    with pytest.raises(PlanError, match=r"needs 10 GPU at once \(large 8; small 2\) but the cluster has 8"):
        check_plan(plan, [{"CPU": 64, "GPU": 8}])
    check_plan(plan, [{"CPU": 64, "GPU": 8}, {"CPU": 64, "GPU": 8}])  # two nodes hold it


def test_strict_pack_replica_must_fit_one_node():
    plan = placements([Competitor("large", "L", engine=_gpu(tp=8, strategy="STRICT_PACK"))])
    with pytest.raises(PlanError, match="single node"):
        check_plan(plan, [{"CPU": 32, "GPU": 4}, {"CPU": 32, "GPU": 4}])
    check_plan(placements([Competitor("large", "L", engine=_gpu(tp=8, strategy="PACK"))]), [{"CPU": 32, "GPU": 4}] * 2)


def test_cpu_plan_leaves_a_cpu_for_ray_data_tasks():
    plan = placements([Competitor("large", "L", engine=EngineConfig(concurrency=2)), Competitor("small", "S", engine=EngineConfig())])
    with pytest.raises(PlanError, match="needs 4 CPU"):
        check_plan(plan, [{"CPU": 3}])
    check_plan(plan, [{"CPU": 4}])


def test_endpoint_competitors_take_request_actors_only():
    ep = EndpointConfig(url="http://127.0.0.1:9/v1", concurrency=2)
    (p,) = placements([Competitor("large", "served", endpoint=ep, params=7_000_000_000)])
    assert p.total("CPU") == 2 and p.total("GPU") == 0 and "endpoint http://127.0.0.1:9/v1" in p.describe()


def test_gsm8k_config_fits_one_8_gpu_node_and_not_a_smaller_one():
    cfg = load_config(ROOT / "configs" / "gsm8k.yaml")
    competitors = competitors_of(cfg, cfg.competitors)
    plan = placements(competitors)
    large, small = plan
    assert large.bundles_per_replica > 1  # tensor parallel for the large model
    assert small.replicas > 1  # several replicas of the small one
    assert sum(p.total("GPU") for p in plan) == 8
    check_plan(plan, [{"CPU": 96, "GPU": 8, "memory": 1e12}])
    with pytest.raises(PlanError, match="GPU"):
        check_plan(plan, [{"CPU": 96, "GPU": 4}])


def test_cpu_models_that_run_one_after_another_need_one_models_cpus_not_all_of_them():
    """The evaluated models of a recipe with SFT's curve: 7 CPU engines of 1 CPU. One machine's CPU
    engines run one wave at a time (engine_waves), so 2 CPUs hold the plan; 7 at once need 8."""
    from lossaverse.cluster.stages import plan_generation

    models = [Competitor(f"target-{i}", "M", engine=EngineConfig()) for i in range(7)]
    lines = []
    plan_generation(models, lines.append, nodes=[{"CPU": 2}])
    assert len(lines) == 7 and all(line.startswith("plan target-") for line in lines)
    with pytest.raises(Exception, match=r"needs 8 CPU at once \(target-0 1; .*target-6 1; Ray Data tasks 1\) but the cluster has 6"):
        plan_generation(models, lines.append, nodes=[{"CPU": 6}], at_once=7)
    plan_generation(models, lines.append, nodes=[{"CPU": 6}], at_once=5)
