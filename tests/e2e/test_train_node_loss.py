"""Nodes lost in training, on a multi-node cluster of this test module's own (tests/multinode.py).

`lossaverse train CONFIG --address ...` runs two Ray Train workers (KTO, DeepSpeed ZeRO-2 over gloo)
with STRICT_SPREAD on a head of 1 CPU and two worker nodes of 2 CPUs: a worker needs 1.5 CPUs, so
each worker node holds exactly one and the head none. The training settings are the suite's
reference run (tests/conftest.py), which the run must reproduce step for step. One run, two losses
(a node dies with every process at once, no graceful shutdown), then a resume:

1. After the first checkpoint the node of rank 1 dies and a fresh node of the same resources takes
   its place: Ray Train (FailureConfig max_failures=2) restarts the group there, from the checkpoint.
2. After a later checkpoint the node of rank 1 dies again, with none in its place: the restarted
   group cannot be placed, and after train.max_failures + 1 waits of
   RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S the command fails with the fix, not a hang.
3. Once a node is back, `lossaverse train --resume` finishes the run from the last checkpoint: the
   reference run's per-step losses and final weights, and the model loads.

The module's own cluster (about 5 s to start, no dashboard), not the session's: the test kills its
nodes and needs exactly two that can hold a worker. It leaves both worker nodes alive.
"""

import json
import math
import re
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import REFERENCE_DATA, REFERENCE_TRAIN, ROOT
from tests.multinode import Job, MultiNode
from tests.unit.test_train import make_datasets

pytestmark = pytest.mark.e2e

STEPS, EVERY = REFERENCE_TRAIN["max_steps"], REFERENCE_TRAIN["checkpoint_every"]  # 16, 4: checkpoints at 4, 8, 12
NODES = ("train_a", "train_b")
MAX_FAILURES = 2  # the first loss takes one; the second, one; the waits for placement after it, up to 3
START_TIMEOUT_S = 20  # Ray Train's wait for a (re)started group's placement


@pytest.fixture(scope="module")
def cluster():
    c = MultiNode(head_cpus=1, dashboard=False)
    try:
        for name in NODES:
            c.add(name, num_cpus=2)
        yield c
    finally:
        left = c.shutdown()
    assert not left, f"processes of the training cluster still alive after its teardown: {left}"


def write_config(tmp: Path, name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    cfg.update(name=name, output_dir=str(tmp), ray={"shared_storage": True})  # every node of this host sees tmp
    cfg["train"] = {**REFERENCE_TRAIN, "recipe": "single", "cpus_per_worker": 1.5, "placement_strategy": "STRICT_SPREAD",
                    "keep_checkpoints": 2, "max_failures": MAX_FAILURES}
    make_datasets(tmp / name, **REFERENCE_DATA)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Watch:
    """Follows a training run through its files: Ray Train's registered checkpoints, each rank's
    status (pid, attempt) and the metrics each logged step appends, with the time each appeared."""

    def __init__(self, storage: Path):
        self.storage, self.logged, self.offset = storage, [], 0
        self.seen: set[int] = set()  # every checkpoint step registered so far (Ray keeps only the last 2)

    def checkpoints(self) -> list[int]:
        try:
            snap = json.loads((self.storage / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
            steps = [c["metrics"]["step"] for c in snap["checkpoint_results"]]
        except (OSError, ValueError, KeyError):
            return []
        self.seen.update(steps)
        return steps

    def status(self, rank: int) -> dict:
        try:
            return json.loads((self.storage / "status" / f"rank{rank}.json").read_text())
        except (OSError, ValueError):
            return {}

    def poll(self) -> None:
        path = self.storage / "metrics.jsonl"
        if path.is_file():
            with open(path) as f:
                f.seek(self.offset)
                while (line := f.readline()).endswith("\n"):
                    self.offset = f.tell()
                    self.logged.append((time.time(), json.loads(line)))

    def until(self, job: Job, condition, what: str, timeout: float = 600):
        """Poll every 0.1 s until `condition()` is truthy; fail if the job ends or `timeout` passes first."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.poll()
            if value := condition():
                return value
            if job.poll() is not None:
                pytest.fail(f"the job ended (exit {job.poll()}) before {what}:\n{job.output[-3000:]}")
            time.sleep(0.1)
        job.stop()
        pytest.fail(f"no {what} in {timeout} s:\n{job.output[-3000:]}")


def rank_nodes(cluster: MultiNode, watch: Watch) -> list[str | None]:
    return [cluster.node_of(watch.status(r).get("pid", -1)) for r in (0, 1)]


def losses(history: list[dict]) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in history}


def kill_rank1_after_a_checkpoint(cluster: MultiNode, job: Job, watch: Watch, attempt: int, after: int = 0) -> dict:
    """Once the group of `attempt` runs and Ray Train has registered a checkpoint past step `after`,
    kill the node of rank 1 (one worker on each worker node, none on the head)."""
    watch.until(job, lambda: watch.status(1).get("attempt") == attempt and max(watch.checkpoints(), default=0) > after,
                f"a checkpoint past step {after} in attempt {attempt}")
    placed = rank_nodes(cluster, watch)
    assert set(placed) == set(NODES), placed
    name, node_id = placed[1], cluster.node_id(placed[1])
    died = cluster.kill(name)
    return {"name": name, "node_id": node_id, "died": died, "checkpoint": max(watch.checkpoints()),
            "logged": max((e["step"] for _, e in watch.logged), default=0)}


def test_two_lost_nodes_a_restart_a_bounded_failure_with_the_fix_and_resume_end_as_the_reference_run(
        cluster, kto_reference, tmp_path):
    start = time.time()
    config = write_config(tmp_path, "lost")
    job = Job("train", config, cluster.address, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)})
    storage = tmp_path / "lost" / "checkpoints"
    watch = Watch(storage)

    # 1. A node lost after the first checkpoint, a fresh one in its place: Ray Train restarts the
    # group there and it resumes from the checkpoint, not from the start.
    first = kill_rank1_after_a_checkpoint(cluster, job, watch, attempt=1)
    fresh = cluster.add(first["name"], num_cpus=2)  # same name, same resources, a new raylet
    restarted = watch.until(job, lambda: watch.status(0).get("attempt") == 2 and watch.status(1).get("attempt") == 2
                            and time.time(), "restart of the worker group")
    placed = rank_nodes(cluster, watch)  # while the workers live
    assert set(placed) == set(NODES) and fresh.node_id != first["node_id"]  # one rank on the fresh node
    after_restart = watch.until(job, lambda: next((e["step"] for t, e in watch.logged if t > restarted), None),
                                "a step after the restart")
    resumed_at = after_restart - 1
    assert resumed_at >= first["checkpoint"] and resumed_at in watch.seen

    # 2. The node of rank 1 lost again after a later checkpoint, with none in its place: a bounded
    # wait, then the error that names the fix and the checkpoint `--resume` continues from.
    second = kill_rank1_after_a_checkpoint(cluster, job, watch, attempt=2, after=resumed_at)
    try:
        code = job.wait(timeout=300)  # three waits of 20 s, and the restarts between them
        failed_after = time.time() - second["died"]
        out = job.output
        assert code == 2, out[-3000:]  # a user-fixable error: one line on stderr, exit 2
        assert f"could not be placed in {MAX_FAILURES + 1} tries of {START_TIMEOUT_S} s" in out, out[-3000:]
        last = int(re.search(r"--resume` continues from the last checkpoint \(step (\d+)\)", out)[1])
        watch.checkpoints()  # under load a later checkpoint can be registered before the lost node's worker dies
        assert last in watch.seen and last == max(watch.seen) and last >= second["checkpoint"]
        assert all(s["attempt"] == 2 and not s["finished"] for s in (watch.status(0), watch.status(1)))
        assert not (tmp_path / "lost" / "model").exists()
    finally:
        back = cluster.add(second["name"], num_cpus=2)  # the cluster's shape again
    watch.poll()  # every step the second attempt logged, before the resume starts

    # 3. `--resume`: only the steps after the last checkpoint run, one rank on the node added back.
    resume_start = time.time()
    resumed = Job("train", config, cluster.address, "--resume")
    watch.until(resumed, lambda: watch.status(0).get("attempt") == 3 and watch.status(1).get("attempt") == 3,
                "the resumed worker group")
    placed = rank_nodes(cluster, watch)
    assert resumed.wait(timeout=900) == 0, resumed.output[-3000:]
    watch.poll()
    assert set(placed) == set(NODES) and back.node_id != second["node_id"]
    ranks = [watch.status(r) for r in (0, 1)]  # attempt 3: the second one's restarts were never placed
    assert all(s["attempt"] == 3 and s["finished"] and s["global_step"] == STEPS and s["optimizer_steps"] == STEPS - last
               for s in ranks)
    assert [e["step"] for t, e in watch.logged if t > resume_start] == list(range(last + 1, STEPS + 1))
    entry = json.loads((tmp_path / "lost" / "manifest.json").read_text())["stages"]["train"]
    assert entry["steps"] == STEPS and entry["attempts"] == 3 and entry["resumed"] is True
    assert [h["step"] for h in entry["history"]] == list(range(1, STEPS + 1))

    # The data order, weights, optimizer state and RNG of the uninterrupted reference run: each
    # step's loss, the steps after each restart included, and the final weights.
    reference = kto_reference["result"]["history"]
    now = losses(json.loads((storage / "metrics.json").read_text()))
    assert sorted(now) == list(range(1, STEPS + 1))
    assert all(math.isclose(now[s], calm, rel_tol=1e-4, abs_tol=1e-6) for s, calm in losses(reference).items()), (now, reference)
    tuned = load_file(tmp_path / "lost" / "model" / "model.safetensors")
    expected = load_file(kto_reference["tmp"] / "model" / "model.safetensors")
    assert all(torch.allclose(tuned[k], expected[k], atol=1e-5) for k in expected)
    AutoModelForCausalLM.from_pretrained(tmp_path / "lost" / "model")
    print(f"\nfirst node lost after step {first['logged']} was logged, restarted from checkpoint {resumed_at} "
          f"{restarted - first['died']:.0f} s after the loss; second lost after step {second['logged']}, failed "
          f"{failed_after:.0f} s after it (3 waits of {START_TIMEOUT_S} s); resumed from step {last}; {time.time() - start:.0f} s in all")
