"""The driver side of training: Ray Train's TorchTrainer around `lossaverse.training.worker.train_func`.

`train_model` plans (lossaverse.training.validate: data, weights, memory; before any worker starts), lays out
the storage folder, runs the TorchTrainer with the ScalingConfig, FailureConfig and checkpoint
settings from the config, prints each logged step as it happens, and moves the final model into
place. Storage layout (`storage`, normally runs/<name>/checkpoints/):

  ray_train/        Ray Train's run: checkpoints (merged over ranks) and its snapshot
  data/             the rows trained on, shuffled once by the seed (every worker reads all of it)
  fingerprint       the train config the checkpoints belong to (checked by --resume)
  metrics.jsonl     per-step metrics, streamed by rank 0; result.json: the final history
  status/           one file per rank (pid, attempt, last checkpoint)
  tensorboard/      when train.report_to has tensorboard
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lossaverse.pipeline.config import ConfigError
from lossaverse.training.validate import TrainPlan, plan_training

RAY_RUN = "ray_train"


def shuffled(table: pa.Table, seed: int) -> pa.Table:
    """A seeded permutation of the rows, whatever order they come in. KTO's KL estimate pairs
    neighbouring rows of a micro-batch, and the datasets are grouped by item, so unshuffled
    neighbours would share a prompt. The datasets' files hold their rows in the order the marking
    tasks finished, which differs from run to run (the same seed gave the default job's SFT run
    its rows in two orders, and two models), so the rows are sorted by every sortable column first."""
    keys = [(f.name, "ascending") for f in table.schema if _sortable(f.type)]
    if keys:
        table = table.sort_by(keys)
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


def _sortable(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_integer(t) or pa.types.is_floating(t))


def prepare_storage(storage: Path, fingerprint: str, resume: bool) -> bool:
    """Start fresh (clear earlier checkpoints) or check that --resume continues the same config.

    Returns True when there is a run to resume.
    """
    fp_file = storage / "fingerprint"
    existing = (storage / RAY_RUN).is_dir() and fp_file.is_file()
    if resume and existing:
        if fp_file.read_text().strip() != fingerprint:
            raise ConfigError(
                f"the checkpoints in {storage} were made with a different train config; run without --resume "
                "to start over, or restore the config they were made with"
            )
        return True
    shutil.rmtree(storage, ignore_errors=True)
    storage.mkdir(parents=True)
    fp_file.write_text(fingerprint + "\n")
    return False


def launch_config(plan: TrainPlan, model: str, storage: Path, out_tmp: Path, seed: int,
                  exports: list[tuple[int, Path]] = ()) -> dict:
    """The worker's whole input (lossaverse.training.worker.train_func reads nothing else): the train
    config once, as the plan resolved it."""
    return {
        "exports": [[step, str(folder)] for step, folder in exports],
        "method": plan.method,
        "train": plan.train.model_dump(mode="json"),
        "model": model,
        "seed": seed,
        "data": str(storage / "data" / "train.parquet"),
        "cache_dir": str(storage / "data" / "cache"),
        "work_dir": str(storage / "work"),
        "status_dir": str(storage / "status"),
        "metrics_log": str(storage / "metrics.jsonl"),
        "result_path": str(storage / "result.json"),
        "tensorboard_dir": str(storage / "tensorboard"),
        "model_out": str(out_tmp),
    }


def torch_trainer(train, loop_config: dict, storage: Path):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # deferred: Ray loads in seconds
    from ray.train.torch import TorchTrainer  # deferred: Ray loads in seconds

    from lossaverse.training.worker import train_func  # deferred: imports huggingface_hub, peft, safetensors

    if train.start_timeout_s is not None:  # read by Ray Train's controller, started from this process
        os.environ[START_TIMEOUT_ENV] = f"{train.start_timeout_s:g}"
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_func,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=train.num_workers, use_gpu=train.use_gpu,
                                     resources_per_worker=resources, placement_strategy=train.placement_strategy),
        run_config=RunConfig(
            name=RAY_RUN,
            storage_path=str(storage),
            # A restarted group that cannot be placed (a node lost, none in its place) times out after
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) and Ray retries the start without end
            # (controller_failure_limit -1); the same budget as for failed workers bounds that wait.
            failure_config=FailureConfig(max_failures=train.max_failures, controller_failure_limit=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.keep_checkpoints),
        ),
    )


class _Tail(threading.Thread):
    """Follows metrics.jsonl while training runs and hands each new entry to `on_log`."""

    def __init__(self, path: Path, on_log: Callable[[dict], None]):
        super().__init__(daemon=True)
        self.path, self.on_log, self.offset = path, on_log, 0
        self.stop = threading.Event()

    def drain(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            while (line := f.readline()).endswith("\n"):
                self.offset = f.tell()
                self.on_log(json.loads(line))

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.drain()


def train_model(train, model: str, datasets_dir: Path, out_dir: Path, storage: Path, seed: int, *,
                params: tuple[int, int] | None, fingerprint: str = "", resume: bool = False,
                on_log: Callable[[dict], None] | None = None, export_at: list[tuple[int, Path]] = ()) -> dict:
    """Train `model` with `train.method` on the datasets under `datasets_dir`; the final model goes
    to `out_dir` (renamed into place only once complete). Each `(step, folder)` of `export_at` also
    writes the model as it stood after `step` into `folder` (renamed into place with the final model).

    Returns the plan's info (method, rows, weights, memory) plus steps, train_loss, resumed,
    attempts, the last logged metrics and `history` (one dict per logged step).
    """
    from transformers import AutoTokenizer  # deferred: transformers loads in seconds

    plan = plan_training(train, datasets_dir, params, AutoTokenizer.from_pretrained(model))
    storage = Path(storage).resolve()
    resumed = prepare_storage(storage, fingerprint, resume)
    data = storage / "data" / "train.parquet"
    if not data.is_file():
        data.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(shuffled(plan.table, seed), data.with_suffix(".tmp"))
        data.with_suffix(".tmp").replace(data)
    out_tmp = _tmp(out_dir)
    shutil.rmtree(out_tmp, ignore_errors=True)
    exports = []
    for step, folder in export_at:
        if not 0 < step < (train.max_steps or 0):
            raise ValueError(f"export_at step {step} is not inside the run's {train.max_steps} steps")
        exports.append((step, _tmp(folder)))
        if not resumed:  # a resumed run past the step wrote it before its checkpoint
            shutil.rmtree(exports[-1][1], ignore_errors=True)

    tail = _Tail(storage / "metrics.jsonl", on_log or (lambda entry: None))
    tail.offset = (storage / "metrics.jsonl").stat().st_size if (storage / "metrics.jsonl").is_file() else 0
    tail.start()
    try:
        result = torch_trainer(train, launch_config(plan, model, storage, out_tmp, seed, exports), storage).fit()
    except Exception as exc:  # fit() raises the run's error
        if (stalled := unplaced(exc, train, storage)) is not None:
            raise stalled from exc
        raise
    finally:
        tail.stop.set()
        tail.join()
        tail.drain()
    if result.error:
        raise result.error
    moves = [(out_tmp, Path(out_dir))] + [(tmp, Path(folder)) for (_, tmp), (_, folder) in zip(exports, export_at)]
    for tmp, final in moves:
        if not (tmp / "config.json").is_file():
            raise RuntimeError(f"training finished without writing {tmp}")
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(final)
    return summarize(plan, storage, resumed)


def _tmp(folder) -> Path:
    return Path(folder).resolve().with_name(f"{Path(folder).name}.tmp")


START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


class WorkersUnplaced(RuntimeError):
    """The worker group could not be (re)started: the cluster lacks the nodes it needs."""


def registered_step(storage: Path) -> int | None:
    """The step of the last checkpoint Ray Train registered, the one `--resume` starts from; the
    ranks' own status files only when Ray's snapshot is not there (a rank can save a checkpoint
    that is never registered, when its group fails before the report completes)."""
    snapshot = storage / "ray_train" / "checkpoint_manager_snapshot.json"
    try:
        steps = [c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError, TypeError):
        steps = [json.loads(p.read_text()).get("last_checkpoint_step") for p in (storage / "status").glob("rank*.json")]
    return max((s for s in steps if s), default=None)


def unplaced(error: Exception, train, storage: Path) -> WorkersUnplaced | None:
    """`error` as a WorkersUnplaced with the fix, when Ray Train gave up waiting for the workers'
    placement group (e.g. a node lost and no node in its place); else None."""
    cause = getattr(error, "controller_failure", None)
    if type(cause).__name__ != "WorkerGroupStartupTimeoutError":
        return None
    wait = f"{train.start_timeout_s:g}" if train.start_timeout_s is not None else os.environ.get(START_TIMEOUT_ENV, "60")
    last = registered_step(storage)
    where = f"the last checkpoint (step {last})" if last else "the start"
    return WorkersUnplaced(
        f"training stopped: {train.num_workers} workers of {train.cpus_per_worker:g} CPU"
        f"{f' and {train.gpus_per_worker:g} GPU' if train.use_gpu else ''} each ({train.placement_strategy}) "
        f"could not be placed in {train.max_failures + 1} tries of {wait} s: the cluster lacks the nodes they need "
        f"(lost, with none in their place, or never there). Add nodes (or lower train.num_workers), then `lossaverse train CONFIG --resume` "
        f"continues from {where}"
    )


def summarize(plan: TrainPlan, storage: Path, resumed: bool) -> dict:
    final = json.loads((storage / "result.json").read_text())
    history = [h for h in final["history"] if "loss" in h]
    attempts = [json.loads(p.read_text())["attempt"] for p in sorted((storage / "status").glob("rank*.json"))]
    last = history[-1] if history else {}
    keep = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "learning_rate", "tokens_per_second")
    return {
        **plan.info,
        "steps": final["steps"],
        "train_loss": final["train_loss"],
        "resumed": resumed,
        "attempts": max(attempts, default=1),
        **{f"last_{k.replace('/', '_')}": last[k] for k in keep if k in last},
        "history": history,
    }


def format_step(entry: dict) -> str:
    """One console line per logged step (under 80 characters): D and U are the mean rewards of
    desirable and undesirable (DPO: chosen and rejected) completions; their margin is in the history."""
    parts = [f"step {entry['step']}/{entry.get('max_steps', '?')}", f"loss {entry['loss']:.4f}"]
    if "kl" in entry:
        parts.append(f"kl {entry['kl']:.3f}")
    for key, label in (("rewards/chosen", "D"), ("rewards/rejected", "U")):
        if key in entry:
            parts.append(f"{label} {entry[key]:+.3f}")
    if "learning_rate" in entry:
        parts.append(f"lr {entry['learning_rate']:.1e}")
    if "tokens_per_second" in entry:
        parts.append(f"{entry['tokens_per_second']:,.0f} tok/s")
    return " ".join(parts)


def console_line(entry: dict, every: int = 10) -> str | None:
    """The console shows every `every`-th logged step and the last one."""
    if entry["step"] % every == 0 or entry["step"] == entry.get("max_steps"):
        return format_step(entry)
    return None
