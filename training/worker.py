"""What each Ray Train worker runs: `train_func(config)`, one TRL trainer per worker.

Everything the worker needs comes in `config` (built by lossaverse.training.train.launch_config). Sharding
is the trainer's distributed sampler only (every worker reads the whole Parquet file; no Ray
dataset shards), so every rank runs the same number of steps; with an uneven row count the sampler
wraps around to fill the last global batch.

Checkpoints: the trainer saves a Hugging Face checkpoint (model, optimizer and DeepSpeed shards,
scheduler, RNG state, trainer state) every `checkpoint_every` steps into a folder of its own rank;
`ReportCheckpoints` hands it to `ray.train.report`, which merges every rank's files into one
checkpoint under the run's storage path. A restarted worker group (after a failure, or
`lossaverse train --resume`) gets that checkpoint from `ray.train.get_checkpoint()` and resumes
from it: same optimizer state, same data order, same step count.

Files this writes (under the run's storage folder):
  status/rank<r>.json  pid, attempt, last checkpoint step, steps done (one per rank, rewritten)
  metrics.jsonl        one line per logged step (rank 0, appended), read live by the driver
  result.json          final steps, loss, per-step history and step timings (rank 0)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from transformers.integrations import TensorBoardCallback

from lossaverse.pipeline.data.rundir import write_json
from lossaverse.training.export import save_final
from lossaverse.training.methods import get_method, method_args, peft_config
from lossaverse.training.zero import deepspeed_config


class WorkerStatus:
    """status/rank<r>.json: lets the driver (and tests) see which process is which rank."""

    def __init__(self, status_dir: str, rank: int):
        self.path = Path(status_dir) / f"rank{rank}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        before = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data = {"rank": rank, "pid": os.getpid(), "attempt": before.get("attempt", 0) + 1,
                     "last_checkpoint_step": before.get("last_checkpoint_step"), "finished": False}
        self.write()

    def write(self, **update) -> None:
        self.data.update(update)
        write_json(self.data, self.path)


class StepMetrics(TrainerCallback):
    """Times every optimizer step, adds tokens/s and samples/s to each log entry, streams the logs.

    The rates count only the time inside steps (forward, backward, optimizer), not logging or
    checkpointing. Runs before the TensorBoard callback (the worker orders them), so TensorBoard
    gets the rates too.
    """

    def __init__(self, global_batch: int, log_path: str | None):
        self.global_batch = global_batch
        self.log_path = log_path
        self.step_seconds: list[tuple[int, float]] = []  # (global step, seconds) for every step run here
        self._began = 0.0
        self._since_log = (0, 0.0, None)  # (steps, seconds, num_tokens at the previous log)

    def on_train_begin(self, args, state, control, **kwargs):
        # The trainers count tokens from 0 in each process, so a resumed run has no baseline yet.
        self._since_log = (0, 0.0, 0.0 if state.global_step == 0 else None)

    def on_step_begin(self, args, state, control, **kwargs):
        self._began = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._began
        self.step_seconds.append((state.global_step, seconds))
        steps, busy, tokens = self._since_log
        self._since_log = (steps + 1, busy + seconds, tokens)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        steps, busy, tokens = self._since_log
        rates = {"samples_per_second": steps * self.global_batch / busy} if busy > 0 else {}
        if busy > 0 and "num_tokens" in logs and tokens is not None:
            rates["tokens_per_second"] = (logs["num_tokens"] - tokens) / busy
        self._since_log = (0, 0.0, logs.get("num_tokens"))
        logs.update(rates)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(rates)
        if self.log_path:
            entry = {"step": state.global_step, "max_steps": state.max_steps, **logs}
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")


class ReportCheckpoints(TrainerCallback):
    """Reports each Hugging Face checkpoint to Ray Train, then frees the local copy.

    Like ray.train.huggingface.transformers.RayTrainReportCallback, but it reports the checkpoint
    folder itself (no extra copy) and removes it once Ray has persisted it, so a worker's disk holds
    at most one checkpoint.
    """

    def __init__(self, status: WorkerStatus):
        self.status = status

    def on_save(self, args, state, control, **kwargs):
        import ray.train  # deferred: Ray loads in seconds

        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        last = next((h for h in reversed(state.log_history) if "loss" in h), {})
        metrics = {"step": state.global_step, **{k: v for k, v in last.items() if isinstance(v, (int, float))}}
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        shutil.rmtree(folder, ignore_errors=True)
        self.status.write(last_checkpoint_step=state.global_step)


class ExportAt(TrainerCallback):
    """Writes the model as it stands after each step of `steps` (step -> folder) into its folder
    (plain Hugging Face format, LoRA merged, as at the end), then training goes on: one SFT run
    gives the recipe's SFT start at `train.sft_steps`, the SFT baseline at the whole budget, and the
    points of its validation curve (`train.sft_curve`). It runs in on_step_end, before the trainer
    saves that step's checkpoint, so a run resumed past a step has already written it. The trainer
    is set after it is built (a callback is handed to the trainer's constructor)."""

    def __init__(self, steps: dict[int, str], save):
        self.steps, self.save, self.trainer = steps, save, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            self.save(self.trainer, self.steps[state.global_step])


def training_args(t: dict, seed: int, output_dir: str) -> dict:
    """The TrainingArguments every method shares: same optimizer settings and step budget."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=t["per_device_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        num_train_epochs=t["epochs"],
        max_steps=t["max_steps"] or -1,
        learning_rate=t["learning_rate"],
        max_grad_norm=t["max_grad_norm"],
        max_length=t["max_length"],
        gradient_checkpointing=t["gradient_checkpointing"],
        deepspeed=deepspeed_config(t["deepspeed"]),
        use_cpu=not t["use_gpu"],
        bf16=t["bf16"] if t["bf16"] is not None else t["use_gpu"],  # TrainConfig.bf16_on
        seed=seed,
        data_seed=seed,
        logging_steps=t["logging_steps"],
        save_strategy="steps" if t["checkpoint_every"] else "no",
        save_steps=t["checkpoint_every"] or 1,
        report_to=[],  # TensorBoard is added as a callback, after StepMetrics
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Text models use every parameter in every forward; DDP's search for unused ones is a
        # second pass over the autograd graph each step.
        ddp_find_unused_parameters=False,
    )


def _tensorboard(logdir: str):
    callback = TensorBoardCallback()
    callback.logging_dir = logdir
    return callback


def leave_process_group() -> None:
    """A single worker without DeepSpeed has no one to talk to: leave the torch.distributed group
    Ray Train set up, so the trainer runs as one plain process. Over a group of one, DDP and the
    trainers' per-step metric gathers still go through gloo, which cost about a fifth of each step
    of the tiny model on CPU (measured: 150 vs 190 samples/s)."""
    if dist.is_initialized():
        dist.destroy_process_group()
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        os.environ.pop(var, None)


def train_func(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train  # deferred: Ray loads in seconds
    from datasets import Dataset  # deferred: datasets loads in seconds


    t = config["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(t["cpus_per_worker"])))
    status = WorkerStatus(config["status_dir"], rank)
    if world == 1 and t["deepspeed"] == "none":
        leave_process_group()

    train = Dataset.from_parquet(config["data"], cache_dir=config["cache_dir"])
    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    model = AutoModelForCausalLM.from_pretrained(config["model"], dtype=torch.bfloat16 if t["use_gpu"] else torch.float32)
    metrics = StepMetrics(t["per_device_batch_size"] * t["gradient_accumulation_steps"] * world,
                          config["metrics_log"] if rank == 0 else None)
    callbacks = [metrics, ReportCheckpoints(status)]

    def save(trainer, out_dir: str) -> None:
        save_final(trainer, tokenizer, out_dir, lora=t["lora"] is not None, base_model=config["model"],
                   scratch=str(Path(output_dir) / f"adapter-{Path(out_dir).name}"), is_main=rank == 0)

    export = ExportAt({int(step): out for step, out in config["exports"]}, save) if config["exports"] else None
    if export is not None:
        callbacks.append(export)
    if "tensorboard" in t["report_to"]:
        callbacks.append(_tensorboard(config["tensorboard_dir"]))
    output_dir = str(Path(config["work_dir"]) / f"rank{rank}")
    trainer = get_method(config["method"]).trainer(
        model, training_args(t, config["seed"], output_dir), method_args(config["method"], t), train, tokenizer,
        callbacks, peft_config(t["lora"]), train=t,
    )
    if export is not None:
        export.trainer = trainer

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        result = trainer.train()
    else:
        with checkpoint.as_directory() as folder:
            result = trainer.train(resume_from_checkpoint=folder)

    save(trainer, config["model_out"])
    status.write(finished=True, global_step=trainer.state.global_step, optimizer_steps=len(metrics.step_seconds))
    if rank == 0:
        write_json({
            "steps": trainer.state.global_step,
            "train_loss": float(result.training_loss),
            "history": trainer.state.log_history,
            "step_seconds": metrics.step_seconds,
            "global_batch": metrics.global_batch,
        }, Path(config["result_path"]))
    ray.train.report({"steps": trainer.state.global_step, "train_loss": float(result.training_loss)})

