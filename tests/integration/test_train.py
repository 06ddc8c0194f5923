"""Training on a local Ray: 2 Ray Train workers on CPU with real TRL trainers and DeepSpeed ZeRO.

The data is built by the real dataset builder from a small in-memory table of marked answers
(`make_datasets`: synthetic problems, the large competitor right, the small one wrong, one
inference error), so every method reads the same datasets/ layout a run produces. The KTO run
here is the suite's reference (tests/conftest.py: ZeRO-3, negatives only, the reference model's
log-probabilities precomputed): the run that loses nodes and resumes, on a multi-node cluster
(tests/e2e/test_train_node_loss.py), must end with its losses and weights. DPO runs with LoRA and
without DeepSpeed (plain DDP); SFT, ZeRO-2 and KTO on both labels run in the e2e whole loop
(tests/e2e/test_run.py).
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lossaverse.cluster.config import TrainConfig
from lossaverse.pipeline.models.tinymodels import resolve_model
from tests.conftest import REFERENCE_TRAIN, train_tiny
from tests.unit.test_train import make_datasets

pytestmark = pytest.mark.integration

ITEMS = 17  # x 2 competitors = 34 answers, one an inference error: 33 KTO rows, an odd count
WORKERS, BATCH = 2, 2
STEPS = REFERENCE_TRAIN["max_steps"]  # the reference run (tests/conftest.py): more than an epoch


def config(**kw) -> TrainConfig:
    base = dict(num_workers=WORKERS, per_device_batch_size=BATCH, epochs=1, learning_rate=1e-3, max_length=64,
                checkpoint_every=0, logging_steps=1)
    return TrainConfig(**{**base, **kw})


def changed(model_dir: Path) -> bool:
    """The trained model loads with transformers and differs from the base weights."""
    AutoModelForCausalLM.from_pretrained(model_dir)
    base = load_file(Path(resolve_model("tiny:small")) / "model.safetensors")
    tuned = load_file(model_dir / "model.safetensors")
    assert set(base) <= set(tuned)
    return any(not torch.equal(base[k], tuned[k]) for k in base)


def statuses(storage: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((storage / "status").glob("rank*.json"))]


def test_kto_zero3_on_negatives_only_changes_the_model_and_logs_every_step(kto_reference):
    """The reference run (tests/conftest.py): KTO, ZeRO-3, 2 workers, an odd row count, every row
    undesirable, the reference model's log-probabilities precomputed, uninterrupted, with TensorBoard."""
    result, tmp = kto_reference["result"], kto_reference["tmp"]
    assert result["steps"] == STEPS and result["rows"] == 33
    assert result["desirable"] == 0 and result["undesirable"] == 33
    assert result["weight_ratio"] is None and result["undesirable_weight"] == 1.0  # "auto" with one class: no reweighting
    assert changed(tmp / "model")
    assert [h["step"] for h in result["history"]] == list(range(1, STEPS + 1))
    for h in result["history"][1:]:
        assert {"loss", "kl", "learning_rate", "tokens_per_second", "samples_per_second"} <= set(h)
        assert h["tokens_per_second"] > 0
    assert all("rewards/chosen" not in h for h in result["history"])  # no desirable rows, no desirable reward
    assert result["history"][-1]["rewards/rejected"] < 0  # the wrong answers became less likely
    assert [e["step"] for e in kto_reference["logged"]] == list(range(1, STEPS + 1))  # streamed live to the driver
    assert list((tmp / "checkpoints" / "tensorboard").glob("events.out.tfevents.*"))
    ray_ckpts = sorted(p for p in (tmp / "checkpoints" / "ray_train").glob("checkpoint_*") if p.is_dir())
    assert len(ray_ckpts) == 2  # keep_checkpoints
    assert (ray_ckpts[-1] / "trainer_state.json").is_file() and (ray_ckpts[-1] / "rng_state_1.pth").is_file()


def test_both_ranks_run_the_same_steps_on_an_odd_row_count(kto_reference):
    ranks = statuses(kto_reference["tmp"] / "checkpoints")
    assert [s["rank"] for s in ranks] == [0, 1]
    assert all(s["optimizer_steps"] == s["global_step"] == STEPS and s["attempt"] == 1 for s in ranks)


def test_dpo_with_lora_and_no_deepspeed_exports_a_merged_plain_model(local_ray, tmp_path):
    train = config(method="dpo", deepspeed="none", lora={"r": 4, "alpha": 8})  # one epoch, no max_steps
    result = train_tiny(train, tmp_path, make_datasets(tmp_path))
    assert result["method"] == "dpo" and result["rows"] == ITEMS - 1
    assert result["steps"] == -(-(ITEMS - 1) // (WORKERS * BATCH))  # an epoch: ceil(pairs / global batch)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "loss"} <= set(result["history"][-1])
    assert result["trainable_params"] < result["params"] / 5
    files = {p.name for p in (tmp_path / "model").iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    assert changed(tmp_path / "model")
    # The adapters stay beside the merged weights, naming the model they were trained on.
    adapter = json.loads((tmp_path / "model" / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and adapter["base_model_name_or_path"] == resolve_model("tiny:small")
    assert (tmp_path / "model" / "adapter" / "adapter_model.safetensors").is_file()
