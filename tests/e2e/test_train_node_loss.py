"""A node lost in training, on a multi-node cluster of this test module's own (tests/multinode.py).

`lossaverse train CONFIG --address ...` runs two Ray Train workers (KTO, DeepSpeed ZeRO-2 over gloo)
with STRICT_SPREAD on a head of 1 CPU and two worker nodes of 2 CPUs: a worker needs 1.5 CPUs, so
each worker node holds exactly one and the head none. After the first checkpoint, the node of rank 1
dies (every process at once, no graceful shutdown).

- With a fresh node of the same resources in its place, Ray Train (FailureConfig max_failures=1)
  restarts the group from the last checkpoint: same steps, same per-step losses, same weights as an
  undisturbed run, and the model loads.
- With none, the restarted group cannot be placed: after train.max_failures + 1 waits of
  RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S the command fails with the fix, not a hang; once a node is
  back, `lossaverse train --resume` finishes the run from the last checkpoint.

The module's own cluster (about 5 s to start, no dashboard), not the session's: these tests kill
its nodes and need exactly two that can hold a worker. Each test leaves both worker nodes alive.
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

from tests.conftest import ROOT
from tests.multinode import Job, MultiNode
from tests.unit.test_train import make_datasets

pytestmark = pytest.mark.e2e

STEPS, EVERY = 12, 4  # 33 KTO rows, a global batch of 4: more than an epoch, checkpoints at steps 4 and 8
NODES = ("train_a", "train_b")
START_TIMEOUT_S = 20  # Ray Train's wait for a (re)started group's placement, in the no-replacement case


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
    cfg["train"] = {
        "method": "kto", "recipe": "single", "max_steps": STEPS, "per_device_batch_size": 2, "num_workers": 2,
        "cpus_per_worker": 1.5, "placement_strategy": "STRICT_SPREAD", "deepspeed": "zero2", "max_length": 64,
        "learning_rate": 1e-3, "logging_steps": 1, "checkpoint_every": EVERY, "keep_checkpoints": 2, "max_failures": 1,
    }
    make_datasets(tmp / name)
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


def losses(storage: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((storage / "metrics.json").read_text())}


def kill_rank1_after_first_checkpoint(cluster: MultiNode, job: Job, watch: Watch) -> dict:
    watch.until(job, watch.checkpoints, "first checkpoint")
    placed = rank_nodes(cluster, watch)
    assert set(placed) == set(NODES), placed  # one worker on each worker node, none on the head
    name, node_id = placed[1], cluster.node_id(placed[1])
    died = cluster.kill(name)
    return {"name": name, "node_id": node_id, "died": died, "checkpoint": max(watch.checkpoints()),
            "logged": max((e["step"] for _, e in watch.logged), default=0)}


@pytest.fixture(scope="module")
def undisturbed(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("calm")
    start = time.time()
    job = Job("train", write_config(tmp, "calm"), cluster.address)
    watch = Watch(tmp / "calm" / "checkpoints")
    watch.until(job, watch.checkpoints, "first checkpoint")
    placed = rank_nodes(cluster, watch)
    code = job.wait(timeout=900)
    assert code == 0, job.output[-3000:]
    return {"run_dir": tmp / "calm", "seconds": time.time() - start, "placed": placed}


def test_undisturbed_workers_run_on_two_nodes(undisturbed):
    assert set(undisturbed["placed"]) == set(NODES)
    storage = undisturbed["run_dir"] / "checkpoints"
    assert sorted(losses(storage)) == list(range(1, STEPS + 1))
    print(f"undisturbed: {undisturbed['seconds']:.0f} s")


def test_a_lost_worker_node_replaced_resumes_from_the_checkpoint_with_the_same_steps_and_data(
        cluster, undisturbed, tmp_path):
    start = time.time()
    job = Job("train", write_config(tmp_path, "lost"), cluster.address)
    storage = tmp_path / "lost" / "checkpoints"
    watch = Watch(storage)
    lost = kill_rank1_after_first_checkpoint(cluster, job, watch)
    fresh = cluster.add(lost["name"], num_cpus=2)  # same name, same resources, a new raylet
    restarted = watch.until(job, lambda: watch.status(0).get("attempt") == 2 and watch.status(1).get("attempt") == 2
                            and time.time(), "restart of the worker group")
    placed = rank_nodes(cluster, watch)  # while the workers live
    training = watch.until(job, lambda: next((t for t, _ in watch.logged if t > restarted), None), "a step after the restart")
    code = job.wait(timeout=900)
    seconds = time.time() - start
    watch.poll()
    assert code == 0, job.output[-3000:]

    ranks = [watch.status(r) for r in (0, 1)]
    assert all(s["attempt"] == 2 and s["finished"] and s["global_step"] == STEPS for s in ranks)
    resumed_at = STEPS - ranks[0]["optimizer_steps"]  # resumed, not restarted: only the steps after it ran
    assert ranks[1]["optimizer_steps"] == ranks[0]["optimizer_steps"]
    assert resumed_at >= lost["checkpoint"] and resumed_at in watch.seen
    assert set(placed) == set(NODES) and fresh.node_id != lost["node_id"]  # one rank on the fresh node
    manifest = json.loads((tmp_path / "lost" / "manifest.json").read_text())["stages"]["train"]
    assert manifest["steps"] == STEPS and manifest["attempts"] == 2

    # The data order, weights and optimizer state of the undisturbed run: each step's loss, the
    # steps after the checkpoint included, and the final weights.
    calm, now = losses(undisturbed["run_dir"] / "checkpoints"), losses(storage)
    assert sorted(now) == list(range(1, STEPS + 1))
    assert all(math.isclose(now[s], calm[s], rel_tol=1e-4, abs_tol=1e-6) for s in calm), (now, calm)
    redone = [e["step"] for t, e in watch.logged if t > restarted]
    assert redone == list(range(resumed_at + 1, STEPS + 1))
    tuned = load_file(tmp_path / "lost" / "model" / "model.safetensors")
    reference = load_file(undisturbed["run_dir"] / "model" / "model.safetensors")
    assert all(torch.allclose(tuned[k], reference[k], atol=1e-5) for k in reference)
    AutoModelForCausalLM.from_pretrained(tmp_path / "lost" / "model")
    print(f"node lost after step {lost['logged']} was logged, resumed from checkpoint {resumed_at}; "
          f"workers restarted {restarted - lost['died']:.0f} s and training again {training - lost['died']:.0f} s "
          f"after the loss; {seconds:.0f} s in all vs {undisturbed['seconds']:.0f} s undisturbed")


def test_no_replacement_node_fails_with_the_fix_after_a_bounded_wait_and_resume_finishes(cluster, undisturbed, tmp_path):
    config = write_config(tmp_path, "alone")
    job = Job("train", config, cluster.address, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(START_TIMEOUT_S)})
    storage = tmp_path / "alone" / "checkpoints"
    watch = Watch(storage)
    lost = kill_rank1_after_first_checkpoint(cluster, job, watch)
    try:
        code = job.wait(timeout=300)  # two waits of 20 s, and the restarts between them
        failed_after = time.time() - lost["died"]
        out = job.output
        assert code == 2, out[-3000:]  # a user-fixable error: one line on stderr, exit 2
        assert f"could not be placed in 2 tries of {START_TIMEOUT_S} s" in out, out[-3000:]
        last = int(re.search(r"--resume` continues from the last checkpoint \(step (\d+)\)", out)[1])
        watch.checkpoints()  # under load a later checkpoint can be registered before the lost node's worker dies
        assert last in watch.seen and last == max(watch.seen)  # the error names Ray's last registered checkpoint
        assert not (tmp_path / "alone" / "model").exists()
    finally:
        cluster.add(lost["name"], num_cpus=2)  # the cluster's shape again, for what follows

    resumed = Job("train", config, cluster.address, "--resume")
    assert resumed.wait(timeout=900) == 0, resumed.output[-3000:]
    ranks = [watch.status(r) for r in (0, 1)]  # attempt 2: the first one's restart never started
    assert all(s["attempt"] == 2 and s["global_step"] == STEPS and s["optimizer_steps"] == STEPS - last for s in ranks)
    assert losses(storage) == pytest.approx(losses(undisturbed["run_dir"] / "checkpoints"), rel=1e-4, abs=1e-6)
    AutoModelForCausalLM.from_pretrained(tmp_path / "alone" / "model")
    print(f"no replacement: failed {failed_after:.0f} s after the loss (2 waits of {START_TIMEOUT_S} s), "
          f"resumed from step {last}")
