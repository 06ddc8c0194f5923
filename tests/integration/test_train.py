"""Training on a local Ray: 2 Ray Train workers on CPU with real TRL trainers and DeepSpeed ZeRO.

The data is built by the real dataset builder from a small in-memory table of marked answers
(`make_datasets`: synthetic problems, the large competitor right, the small one wrong, one
inference error), so every method reads the same datasets/ layout a run produces.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lossaverse.cluster.config import TrainConfig, load_config
from lossaverse.cluster.runner import execute
from lossaverse.cluster.stages import stage_fingerprints
from lossaverse.pipeline.models.tinymodels import resolve_model
from tests.conftest import ROOT
from tests.unit.test_train import make_datasets
from lossaverse.training.train import train_model
from lossaverse.training.validate import target_parameters

pytestmark = pytest.mark.integration

ITEMS = 17  # x 2 competitors = 34 answers, one an inference error: 33 KTO rows, an odd count
WORKERS, BATCH = 2, 2
STEPS = 2 * -(-33 // (WORKERS * BATCH))  # 2 epochs of ceil(33 / 4) global batches


def config(**kw) -> TrainConfig:
    base = dict(num_workers=WORKERS, per_device_batch_size=BATCH, epochs=2, learning_rate=1e-3, max_length=64,
                checkpoint_every=3, logging_steps=1)
    return TrainConfig(**{**base, **kw})


def run(train: TrainConfig, tmp: Path, datasets: Path, **kw) -> dict:
    model = resolve_model("tiny:small")
    return train_model(train, model, datasets, tmp / "model", tmp / "checkpoints", seed=0,
                       params=target_parameters(model, train), **kw)


def changed(model_dir: Path) -> bool:
    """The trained model loads with transformers and differs from the base weights."""
    AutoModelForCausalLM.from_pretrained(model_dir)
    base = load_file(Path(resolve_model("tiny:small")) / "model.safetensors")
    tuned = load_file(model_dir / "model.safetensors")
    assert set(base) <= set(tuned)
    return any(not torch.equal(base[k], tuned[k]) for k in base)


def statuses(storage: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((storage / "status").glob("rank*.json"))]


class Killer(threading.Thread):
    """Kills rank 1's process (SIGKILL, by the pid its status file names) once per attempt, as soon
    as Ray Train has registered a checkpoint newer than the one the attempt resumed from: mid-run."""

    def __init__(self, storage: Path, kills: int):
        super().__init__(daemon=True)
        self.storage, self.kills, self.killed, self.done = storage, kills, [], threading.Event()

    def _state(self) -> tuple[int, dict]:
        snapshot = json.loads((self.storage / "ray_train" / "checkpoint_manager_snapshot.json").read_text())
        registered = [c["metrics"]["step"] for c in snapshot["checkpoint_results"]]
        return max(registered, default=0), json.loads((self.storage / "status" / "rank1.json").read_text())

    def run(self):
        deadline = time.time() + 600
        while len(self.killed) < self.kills and not self.done.is_set() and time.time() < deadline:
            time.sleep(0.05)
            try:
                step, status = self._state()
            except (OSError, ValueError, KeyError):
                continue
            last = self.killed[-1] if self.killed else {"attempt": 0, "checkpoint": 0}
            if status["attempt"] > last["attempt"] and step > last["checkpoint"] and not status["finished"]:
                os.kill(status["pid"], signal.SIGKILL)
                self.killed.append({"attempt": status["attempt"], "checkpoint": step})


@pytest.fixture(scope="module")
def kto_run(local_ray, tmp_path_factory):
    """KTO, ZeRO-2, 2 workers, an odd row count, uninterrupted, with TensorBoard."""
    tmp = tmp_path_factory.mktemp("kto")
    logged = []
    result = run(config(deepspeed="zero2", report_to=["tensorboard"]), tmp, make_datasets(tmp), on_log=logged.append)
    return {"tmp": tmp, "result": result, "logged": logged}


def test_kto_zero2_changes_the_model_and_logs_every_step(kto_run):
    result, tmp = kto_run["result"], kto_run["tmp"]
    assert result["steps"] == STEPS and result["rows"] == 33
    assert changed(tmp / "model")
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    for h in result["history"][1:]:
        assert {"loss", "kl", "learning_rate", "tokens_per_second", "samples_per_second"} <= set(h)
        assert h["tokens_per_second"] > 0
    assert any("rewards/margins" in h for h in result["history"])
    assert [e["step"] for e in kto_run["logged"]] == list(range(1, STEPS + 1))  # streamed live to the driver
    assert list((tmp / "checkpoints" / "tensorboard").glob("events.out.tfevents.*"))
    ray_ckpts = sorted(p for p in (tmp / "checkpoints" / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert len(ray_ckpts) == 2  # keep_checkpoints
    assert (ray_ckpts[-1] / "trainer_state.json").is_file() and (ray_ckpts[-1] / "rng_state_1.pth").is_file()


def test_both_ranks_run_the_same_steps_on_an_odd_row_count(kto_run):
    ranks = statuses(kto_run["tmp"] / "checkpoints")
    assert [s["rank"] for s in ranks] == [0, 1]
    assert all(s["optimizer_steps"] == s["global_step"] == STEPS and s["attempt"] == 1 for s in ranks)


def test_killed_workers_resume_and_train_resume_finishes_the_run(local_ray, tmp_path, kto_run):
    """Kill rank 1 after the first checkpoint: Ray Train restarts the workers (max_failures=1) and
    they resume from it. Kill it again after a later checkpoint: the run fails (no failures left).
    `lossaverse train --resume` then continues it to the end, with the same steps and the same
    weights as the uninterrupted run."""
    overrides = [f"output_dir={tmp_path}", "name=resume", "train.max_failures=1", "train.epochs=2",
                 f"train.num_workers={WORKERS}", f"train.per_device_batch_size={BATCH}", "train.checkpoint_every=3",
                 "train.max_length=64", "train.learning_rate=1e-3", "train.deepspeed=zero2",
                 # the settings of `kto_run` (TrainConfig's defaults), whatever the default job tunes
                 "train.compare=[]", "train.beta=0.1", "train.undesirable_weight=1.0", "train.desirable_weight=1.0",
                 "train.recipe=single", "train.max_steps=null"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", overrides)
    make_datasets(cfg.run_dir)
    storage = cfg.run_dir / "checkpoints"
    killer = Killer(storage, kills=2)
    killer.start()
    with pytest.raises(Exception, match="(?i)worker"):
        execute(cfg, ["train"], report=lambda line: None)
    killer.done.set()
    assert [k["attempt"] for k in killer.killed] == [1, 2], "training finished before both kills"
    second = statuses(storage)
    assert all(s["attempt"] == 2 and not s["finished"] for s in second)
    assert not (cfg.run_dir / "model").exists()

    resumed = load_config(ROOT / "configs" / "tiny.yaml", overrides + ["train.resume=true"])
    assert stage_fingerprints(resumed) == stage_fingerprints(cfg)  # --resume does not change the run's identity
    entry = execute(resumed, ["train"], report=lambda line: None).stage("train")
    assert entry["resumed"] is True and entry["attempts"] == 3
    assert entry["steps"] == kto_run["result"]["steps"] == STEPS
    assert [h["step"] for h in entry["history"]] == list(range(1, STEPS + 1))
    last = statuses(storage)
    # The third attempt ran only the steps after the second kill's checkpoint: it resumed, not restarted.
    assert all(s["attempt"] == 3 and s["global_step"] == STEPS for s in last)
    assert all(0 < s["optimizer_steps"] <= STEPS - killer.killed[1]["checkpoint"] for s in last)
    # Same data order, optimizer state and RNG after each resume: the weights of the uninterrupted run.
    resumed_w = load_file(cfg.run_dir / "model" / "model.safetensors")
    uninterrupted = load_file(kto_run["tmp"] / "model" / "model.safetensors")
    assert all(torch.allclose(resumed_w[k], uninterrupted[k], atol=1e-5) for k in uninterrupted)


def test_kto_zero3_on_negatives_only_with_precomputed_reference(local_ray, tmp_path):
    datasets = make_datasets(tmp_path, large_right=False)
    train = config(deepspeed="zero3", weights="auto", precompute_ref_log_probs=True, epochs=1, checkpoint_every=0)
    result = run(train, tmp_path, datasets)
    assert result["desirable"] == 0 and result["undesirable"] == 33
    assert result["weight_ratio"] is None and result["undesirable_weight"] == 1.0
    assert result["steps"] == STEPS // 2
    assert all("rewards/chosen" not in h for h in result["history"])  # no desirable rows, no desirable reward
    assert result["history"][-1]["rewards/rejected"] < 0  # the wrong answers became less likely
    assert changed(tmp_path / "model")


def test_dpo_with_lora_exports_a_merged_plain_model(local_ray, tmp_path):
    train = config(method="dpo", deepspeed="zero2", lora={"r": 4, "alpha": 8}, epochs=1, checkpoint_every=0, max_steps=4)
    result = run(train, tmp_path, make_datasets(tmp_path))
    assert result["method"] == "dpo" and result["rows"] == ITEMS - 1 and result["steps"] == 4
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "loss"} <= set(result["history"][-1])
    assert result["trainable_params"] < result["params"] / 5
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    assert changed(tmp_path / "model")
    # The adapters stay beside the merged weights, naming the model they were trained on.
    adapter = json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["base_model_name_or_path"] == resolve_model("tiny:small")
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()


def test_sft_trains_on_the_correct_answers_only(local_ray, tmp_path):
    train = config(method="sft", deepspeed="none", epochs=1, checkpoint_every=0, max_steps=4)
    result = run(train, tmp_path, make_datasets(tmp_path))
    assert result["method"] == "sft" and result["rows"] == ITEMS  # the large competitor's answers
    assert result["steps"] == 4 and "loss" in result["history"][-1]
    assert changed(tmp_path / "model")
