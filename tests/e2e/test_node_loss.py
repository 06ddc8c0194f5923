"""Faults on the multi-node cluster (tests/conftest.py `multinode`): jobs connect by `--address`.

The generate stage runs on three worker nodes with each competitor pinned by a custom resource:
`large` to node_b or node_d (`gen_large`), `small` to node_c (`gen_small`). Killing the node that
holds the large engine, with every one of its processes at once, must cost time only: Ray restarts
the engine actor on the other `gen_large` node, retries the batches lost with it, and the answers
hold exactly one row per (item, competitor, sample).
"""

import json
import time
from pathlib import Path

import pytest
import yaml

from lossaverse.pipeline.rundir import read_table
from lossaverse.pipeline.schemas import ANSWERS
from tests.conftest import MULTINODE_NODES, ROOT
from tests.multinode import Job

pytestmark = pytest.mark.e2e

N_TRAIN, SAMPLES, SHARD_ITEMS = 48, 2, 4
ENGINE = "vLLMEngineStage"  # in the title of the engine actor's worker process


def write_config(tmp: Path, name: str, shared: bool = True) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    cfg.update(name=name, output_dir=str(tmp))
    cfg["ray"] = {"shared_storage": shared}  # every node of this one-host cluster sees tmp
    cfg["benchmark"].update(n_train=N_TRAIN, n_validation=0, n_eval=4)
    cfg["generate"].update(shard_items=SHARD_ITEMS, progress_interval_s=1)
    cfg["generate"]["engine"].update(batch_size=4)
    cfg["generate"]["sampling"].update(samples=SAMPLES, max_tokens=24)
    # One sequence at a time: with 32 at once the large engine gives all 96 answers in about 3 s,
    # often before the driver has written its first shard, and the kill then finds nothing left to
    # lose; one at a time they take about 10 s, and the kill falls while it still has answers to give.
    cfg["competitors"]["large"]["engine"] = {"resources": {"gen_large": 1}, "engine_kwargs": {"max_num_seqs": 1}}
    cfg["competitors"]["small"]["engine"] = {"resources": {"gen_small": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start_generate(config: Path, address: str) -> Job:
    return Job("generate", config, address)


def engine_nodes(cluster) -> set[str]:
    return {name for name in cluster.nodes if cluster.holds(name, ENGINE)}


def assert_conserved(run_dir: Path) -> None:
    answers = read_table(run_dir / "answers", ANSWERS)
    keys = list(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * N_TRAIN * SAMPLES  # none lost, none twice
    assert answers.filter(answers["error"].is_valid()).num_rows == 0


@pytest.fixture(scope="module")
def undisturbed(multinode, tmp_path_factory):
    """The job on all three nodes, nothing killed: where each engine ran, and its wall time."""
    tmp = tmp_path_factory.mktemp("gen")
    start = time.time()
    job = start_generate(write_config(tmp, "calm"), multinode.address)
    seen: set[str] = set()
    try:
        while job.poll() is None and time.time() < start + 900:
            seen |= engine_nodes(multinode)
            time.sleep(0.2)
    finally:
        job.stop()
    out = job.output
    assert job.poll() == 0, out[-3000:]
    return {"run_dir": tmp / "calm", "seconds": time.time() - start, "engines_on": seen, "out": out}


def test_engines_run_on_the_nodes_their_resources_name(undisturbed):
    assert "ray: connected to" in undisturbed["out"]
    on = undisturbed["engines_on"]
    assert "node_c" in on  # small: the only gen_small node
    assert len(on & {"node_b", "node_d"}) == 1  # large: one replica, on a gen_large node
    assert_conserved(undisturbed["run_dir"])


def test_a_local_output_dir_on_several_nodes_is_refused_with_the_fix(multinode, tmp_path):
    job = start_generate(write_config(tmp_path, "local", shared=False), multinode.address)
    code = job.wait(timeout=180)
    out = job.output
    assert code == 2, out[-3000:]
    assert "4 nodes" in out and "every node mounts" in out and "ray.shared_storage=true" in out
    assert not (tmp_path / "local" / "answers").exists()


def generate_summary(run_dir: Path) -> dict:
    """The generate stage's per-competitor totals in the run's manifest."""
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["competitors"]


def test_losing_the_large_engines_node_mid_generation_costs_time_not_rows(multinode, undisturbed, tmp_path):
    run_dir = tmp_path / "lost"
    shards = N_TRAIN // SHARD_ITEMS
    start = time.time()
    job = start_generate(write_config(tmp_path, "lost"), multinode.address)
    victim = None
    try:
        deadline = time.time() + 600
        while victim is None and time.time() < deadline:
            assert job.poll() is None, "generate ended before the node could be killed:\n" + job.output[-3000:]
            on = engine_nodes(multinode) & {"node_b", "node_d"}
            # mid-generation: the large engine is up and some, not all, of its answers are written
            written = len(list((run_dir / "answers.shards").glob("large-*.parquet")))
            if on and 0 < written < shards:
                victim = on.pop()
            time.sleep(0.1)
        assert victim, "the large engine never started:\n" + job.output[-3000:]
        died = multinode.kill(victim)
        survivor = ({"node_b", "node_d"} - {victim}).pop()
        restarted = None
        while job.poll() is None and time.time() < start + 900:
            if restarted is None and multinode.holds(survivor, ENGINE):
                restarted = time.time() - died
            time.sleep(0.2)
        end = time.time()
        assert job.poll() == 0, job.output[-4000:]
    finally:
        job.stop()
        if victim and victim not in multinode.nodes:  # the next test gets the same cluster shape
            multinode.add(victim, num_cpus=2, resources=MULTINODE_NODES[victim])
    assert_conserved(run_dir)
    assert restarted is not None, "the large engine did not restart on the other gen_large node"
    summary = generate_summary(run_dir)
    # The large replica's answers came from two processes (the one killed, its restart); small's from one.
    assert summary["large"]["engines_ran"] == 1 and summary["large"]["engine_restarts"] >= 1, summary["large"]
    assert summary["small"]["engine_restarts"] == 0, summary["small"]
    lost = (end - start) - undisturbed["seconds"]
    print(f"\nnode lost in generation: {written}/{shards} large shards written at the kill; engine back on "
          f"{survivor} {restarted:.1f} s after it; job {end - start:.1f} s against {undisturbed['seconds']:.1f} s "
          f"undisturbed: {lost:.1f} s lost")
