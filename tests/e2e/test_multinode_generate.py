"""Generation on a multi-node cluster of this module's own (tests/multinode.py), which stops when
its tests end: jobs connect by `--address` or are submitted through the dashboard.

- `lossaverse submit` through the dashboard address, as a user would: the project is uploaded as the
  job's working_dir, the job's driver runs on the head and its generate stage places each
  competitor's engine on the node its resource names (`large` on node_b or node_d, `gen_large`;
  `small` on node_c, `gen_small`), with exactly one answer row per (item, competitor, sample).
- A run directory that is not on storage every node mounts is refused with the fix.
- Killing the node that holds the large engine, with every one of its processes at once, must cost
  time only: Ray restarts the engine actor on the other `gen_large` node, retries the batches lost
  with it, and the answers hold exactly one row per (item, competitor, sample).
"""

import json
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from tests.conftest import ROOT, run_cli
from tests.multinode import Job, MultiNode

pytestmark = pytest.mark.e2e

# The multi-node cluster: a head (1 CPU, where drivers run) and three worker nodes of 2 CPUs, each
# with a custom resource of its name; node_b and node_d can hold the large competitor's engine
# (`gen_large`), node_c the small one's (`gen_small`). One for this module's tests, stopped when they end.
MULTINODE_NODES = {"node_b": {"gen_large": 1}, "node_c": {"gen_small": 1}, "node_d": {"gen_large": 1}}


@pytest.fixture(scope="module")
def multinode():
    """A real multi-raylet Ray cluster on this machine (tests/multinode.py), killed by pid at the end."""
    cluster = MultiNode(head_cpus=1)
    try:
        for name, resources in MULTINODE_NODES.items():
            cluster.add(name, num_cpus=2, resources=resources)
        yield cluster
    finally:
        left = cluster.shutdown()
    assert not left, f"processes of the multi-node cluster still alive after its teardown: {left}"


N_TRAIN, SAMPLES, SHARD_ITEMS = 48, 2, 4
ENGINE = "vLLMEngineStage"  # in the title of the engine actor's worker process


def write_config(tmp: Path, name: str, shared: bool = True) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
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


# The submitted job: a smaller one (8 items, one sample each).
SUBMIT_TRAIN, SUBMIT_SAMPLES = 8, 1


def overrides(tmp) -> list[str]:
    sets = [f"output_dir={tmp}", "name=submitted", "ray.shared_storage=true",  # every node of this host sees tmp
            f"benchmark.n_train={SUBMIT_TRAIN}", "benchmark.n_validation=0", "benchmark.n_eval=4",
            f"generate.sampling.samples={SUBMIT_SAMPLES}", "generate.sampling.max_tokens=16", "generate.engine.batch_size=4",
            "competitors.large.engine.resources={gen_large: 1}", "competitors.small.engine.resources={gen_small: 1}"]
    return [arg for s in sets for arg in ("--set", s)]


def job_engine_nodes(dashboard: str, job_id: str) -> set[str]:
    """The node ids of the job's engine actors, from Ray's state API (dead actors included)."""
    actors = list_actors(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.node_id for a in actors if ENGINE in (a.repr_name or "") + a.class_name}


def test_a_submitted_generate_job_succeeds_with_its_engines_on_two_nodes(multinode, tmp_path):
    multinode.wait_jobs_api()
    start = time.monotonic()
    out = run_cli("submit", "configs/tiny.yaml", "--command", "generate", *overrides(tmp_path),
                  "--address", multinode.dashboard, timeout=900)
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    job = next(l for l in lines if l.startswith("submitted job ")).split()[-1]
    assert lines[-1] == f"job {job}: SUCCEEDED"
    assert f"ray: connected to {multinode.address}" in out.stdout  # the job's driver joined this cluster

    answers = read_table(tmp_path / "submitted" / "answers", ANSWERS)
    keys = set(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert answers.num_rows == len(keys) == 2 * SUBMIT_TRAIN * SUBMIT_SAMPLES
    assert answers.filter(answers["error"].is_valid()).num_rows == 0

    details = JobSubmissionClient(multinode.dashboard).get_job_info(job)
    names = {multinode.node_id(n): n for n in multinode.nodes}
    on = {names.get(node, node) for node in job_engine_nodes(multinode.dashboard, details.driver_info.id)}
    assert "node_c" in on and len(on & {"node_b", "node_d"}) == 1 and len(on) == 2, on
    print(f"submitted generate job: {seconds:.0f} s, engines on {sorted(on)}")


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


def test_losing_the_large_engines_node_mid_generation_costs_time_not_rows(multinode, tmp_path):
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
    print(f"\nnode lost in generation: {written}/{shards} large shards written at the kill; engine back on "
          f"{survivor} {restarted:.1f} s after it; job {end - start:.1f} s")
