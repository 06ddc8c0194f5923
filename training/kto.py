"""KTO on Ray Train: one `train_func` per worker running TRL's `KTOTrainer` with DeepSpeed ZeRO.

KTO (Ethayarajh et al., ICML 2024, Eq. 8): with r(x, y) = log pi(y|x) / pi_ref(y|x) and the
reference point z0 = KL(pi(y'|x) || pi_ref(y'|x)) estimated from mismatched prompt/completion
pairs of the same micro-batch,

    v(x, y) = lambda_D * sigmoid(beta * (r(x, y) - z0))   if y is desirable
              lambda_U * sigmoid(beta * (z0 - r(x, y)))   if y is undesirable
    L_KTO   = E[lambda_y - v(x, y)]

TRL's trainer implements exactly this; we configure it (beta, desirable_weight = lambda_D,
undesirable_weight = lambda_U) rather than re-implement it. Sharding is the trainer's distributed
sampler only (no Ray dataset shards), so every rank runs the same number of steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

DEEPSPEED_DIR = Path(__file__).parent / "deepspeed"


def deepspeed_config(name: str) -> dict | None:
    """A shipped DeepSpeed config by name (zero2, zero3, zero3_offload), or None for `none`."""
    if name == "none":
        return None
    path = DEEPSPEED_DIR / f"{name}.json"
    if not path.is_file():
        valid = sorted(p.stem for p in DEEPSPEED_DIR.glob("*.json")) + ["none"]
        raise ValueError(f"unknown DeepSpeed config {name!r}; valid: {valid}")
    return json.loads(path.read_text())


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker; everything it needs comes in `config`."""
    import ray.train
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    rank = ray.train.get_context().get_world_rank()
    torch.set_num_threads(1)
    history: list[dict] = []

    class History(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                history.append({"step": state.global_step, **{k: float(v) for k, v in logs.items() if isinstance(v, (int, float))}})

    train = Dataset.from_parquet(config["data"]).select_columns(["prompt", "completion", "label"])
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.bfloat16 if config["use_gpu"] else torch.float32)
    t = config["train"]
    args = KTOConfig(
        output_dir=config["work_dir"],
        per_device_train_batch_size=t["per_device_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        num_train_epochs=t["epochs"],
        learning_rate=t["learning_rate"],
        beta=t["beta"],
        desirable_weight=t["desirable_weight"],
        undesirable_weight=t["undesirable_weight"],
        max_length=t["max_length"],
        deepspeed=deepspeed_config(t["deepspeed"]),
        use_cpu=not config["use_gpu"],
        bf16=config["use_gpu"],
        seed=config["seed"],
        data_seed=config["seed"],
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = KTOTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer, callbacks=[History()])
    result = trainer.train()
    trainer.save_model(config["model_out"])  # every rank: ZeRO-3 gathers shards; rank 0 writes
    if rank == 0:
        tokenizer.save_pretrained(config["model_out"])
        Path(config["history"]).write_text(json.dumps(history))
    ray.train.report({"train_loss": float(result.training_loss), "steps": int(result.global_step)})


def train_kto(data: Path, model: str, out_dir: Path, train_cfg, seed: int, storage: Path) -> dict:
    """Train `model` on the KTO dataset at `data`; write the final model to `out_dir`.

    Returns {"steps", "train_loss", "history": [per-step logs]}. `out_dir` appears only once the
    model is complete (written to a temporary folder and renamed).
    """
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tmp = out_dir.with_name(f"{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    storage = Path(storage).resolve()
    history = storage / "history.json"
    trainer = TorchTrainer(
        train_func,
        train_loop_config={
            "data": str(Path(data).resolve() / "*.parquet"),
            "model": model,
            "model_out": str(tmp.resolve()),
            "work_dir": str(storage / "work"),
            "history": str(history),
            "train": train_cfg.model_dump(),
            "use_gpu": train_cfg.use_gpu,
            "seed": seed,
        },
        scaling_config=ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=train_cfg.use_gpu,
            resources_per_worker={"CPU": train_cfg.cpus_per_worker, **({"GPU": 1} if train_cfg.use_gpu else {})},
        ),
        run_config=RunConfig(storage_path=str(storage), name="ray_train"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    logs = json.loads(history.read_text())
    final = next((h for h in reversed(logs) if "train_loss" in h), {})
    return {"train_loss": final.get("train_loss"), "steps": final.get("step", 0), "history": logs}
