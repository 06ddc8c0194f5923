"""Generation on a multi-node cluster of this module's own (tests/multinode.py), which stops when
its tests end: jobs are submitted through the dashboard or connect by `--address`.

- `lossaverse submit` through the dashboard address, as a user would: the project is uploaded as the
  job's working_dir, the job's driver runs on the head and its generate stage places each
  competitor's engine on the node its resource names (`large` on node_b or node_d, `gen_large`;
  `small` on node_c, `gen_small`). Mid-generation the node that holds the large engine dies, with
  every one of its processes at once, and that must cost time only: Ray restarts the engine actor on
  the other `gen_large` node, retries the batches lost with it, the job succeeds, and the answers
  hold exactly one row per (item, competitor, sample).
- A run directory that is not on storage every node mounts is refused with the fix.
"""

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from ray.job_submission import JobSubmissionClient
from ray.util.state import list_actors

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from tests.conftest import LOSSAVERSE, ROOT
from tests.multinode import Job, MultiNode, driver_env

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
    cfg["ray"] = {"shared_storage": shared}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def engine_nodes(cluster) -> set[str]:
    return {name for name in cluster.nodes if cluster.holds(name, ENGINE)}


def assert_conserved(run_dir: Path) -> None:
    answers = read_table(run_dir / "answers", ANSWERS)
    keys = list(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * N_TRAIN * SAMPLES  # none lost, none twice
    assert answers.filter(answers["error"].is_valid()).num_rows == 0


def overrides(tmp) -> list[str]:
    """The submitted job's settings on configs/tiny.yaml (the job's driver reads the project as uploaded).
    The large engine takes one sequence at a time: with 32 at once it gives all 96 answers in about
    3 s, often before the driver has written its first shard, and the kill then finds nothing left
    to lose; one at a time they take about 10 s, and the kill falls while it still has answers to give."""
    sets = [f"output_dir={tmp}", "name=submitted", "ray.shared_storage=true",  # every node of this host sees tmp
            f"benchmark.n_train={N_TRAIN}", "benchmark.n_validation=0", "benchmark.n_eval=4",
            f"generate.shard_items={SHARD_ITEMS}", "generate.progress_interval_s=1", "generate.engine.batch_size=4",
            f"generate.sampling.samples={SAMPLES}", "generate.sampling.max_tokens=24",
            "competitors.large.engine.resources={gen_large: 1}", "competitors.large.engine.engine_kwargs={max_num_seqs: 1}",
            "competitors.small.engine.resources={gen_small: 1}"]
    return [arg for s in sets for arg in ("--set", s)]


def job_engine_nodes(dashboard: str, job_id: str) -> set[str]:
    """The node ids of the job's engine actors, from Ray's state API (dead actors included)."""
    actors = list_actors(address=dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000,
                         raise_on_missing_output=False)
    return {a.node_id for a in actors if ENGINE in (a.repr_name or "") + a.class_name}


def generate_summary(run_dir: Path) -> dict:
    """The generate stage's per-competitor totals in the run's manifest."""
    return json.loads((run_dir / "manifest.json").read_text())["stages"]["generate"]["competitors"]


def test_a_submitted_generate_job_loses_the_large_engines_node_and_costs_time_not_rows(multinode, tmp_path):
    """`lossaverse submit` through the dashboard, as a user would; mid-generation the node that holds
    the large engine dies with every one of its processes. The job succeeds: Ray restarts the engine
    actor on the other `gen_large` node and retries the batches lost with it."""
    multinode.wait_jobs_api()
    run_dir, shards = tmp_path / "submitted", N_TRAIN // SHARD_ITEMS
    log = tmp_path / "submit.log"
    start = time.time()
    with log.open("w") as out:
        submit = subprocess.Popen([*LOSSAVERSE, "submit", "configs/tiny.yaml", "--command", "generate", *overrides(tmp_path),
                                   "--address", multinode.dashboard], cwd=ROOT, env=driver_env(), stdout=out,
                                  stderr=subprocess.STDOUT)
    victim = victim_id = None
    try:
        deadline = time.time() + 600
        while victim is None and time.time() < deadline:
            assert submit.poll() is None, "the job ended before the node could be killed:\n" + log.read_text()[-3000:]
            on = engine_nodes(multinode) & {"node_b", "node_d"}
            # mid-generation: the large engine is up and some, not all, of its answers are written
            written = len(list((run_dir / "answers.shards").glob("large-*.parquet")))
            if len(on) == 1 and 0 < written < shards:  # one gen_large node holds it: the other is the spare
                victim = on.pop()
            time.sleep(0.1)
        assert victim, "the large engine never started:\n" + log.read_text()[-3000:]
        victim_id = multinode.node_id(victim)
        died = multinode.kill(victim)
        survivor = ({"node_b", "node_d"} - {victim}).pop()
        restarted = None
        while submit.poll() is None and time.time() < start + 900:
            if restarted is None and multinode.holds(survivor, ENGINE):
                restarted = time.time() - died
            time.sleep(0.2)
        end = time.time()
        out = log.read_text()
        assert submit.poll() == 0, out[-4000:]
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait(timeout=30)
        if victim and victim not in multinode.nodes:  # the next test gets the same cluster shape
            multinode.add(victim, num_cpus=2, resources=MULTINODE_NODES[victim])
    lines = out.strip().splitlines()
    job = next(l for l in lines if l.startswith("submitted job ")).split()[-1]
    assert lines[-1] == f"job {job}: SUCCEEDED"
    assert f"ray: connected to {multinode.address}" in out  # the job's driver joined this cluster

    assert_conserved(run_dir)
    assert restarted is not None, "the large engine did not restart on the other gen_large node"
    summary = generate_summary(run_dir)
    # The large replica's answers came from two processes (the one killed, its restart); small's from one.
    assert summary["large"]["engines_ran"] == 1 and summary["large"]["engine_restarts"] >= 1, summary["large"]
    assert summary["small"]["engine_restarts"] == 0, summary["small"]
    # Each competitor's engine ran where its resource names: small on node_c; large on one gen_large
    # node (the victim, seen in its processes), then, once that node was lost, on the other: Ray's
    # state API gives a restarted actor's last node.
    details = JobSubmissionClient(multinode.dashboard).get_job_info(job)
    names = {multinode.node_id(n): n for n in multinode.nodes} | {victim_id: victim}
    on = {names.get(node, node) for node in job_engine_nodes(multinode.dashboard, details.driver_info.id)}
    assert on == {"node_c", survivor}, on
    print(f"\nnode lost in a submitted generate job: {written}/{shards} large shards written at the kill; engine "
          f"back on {survivor} {restarted:.1f} s after it; job {end - start:.1f} s")


def test_a_local_output_dir_on_several_nodes_is_refused_with_the_fix(multinode, tmp_path):
    job = Job("generate", write_config(tmp_path, "local", shared=False), multinode.address)
    code = job.wait(timeout=180)
    out = job.output
    assert code == 2, out[-3000:]
    assert "4 nodes" in out and "every node mounts" in out and "ray.shared_storage=true" in out
    assert not (tmp_path / "local" / "answers").exists()
