"""Training throughput: Ray Train against TRL called directly, and how it scales with workers.

`bench_train` trains the same tiny model on the same rows with the same settings
1. with TRL's trainer called directly in one process (no Ray, no DeepSpeed), and
2. through Ray Train (`lossaverse.training.train.train_model`) with 1 and 2 workers, DDP over gloo
   (`deepspeed: none`) and DeepSpeed ZeRO-2,
and reports steady-state training samples/s for each. Steady state excludes start-up: the rate is
taken from the trainer's own step timings (`lossaverse.training.worker.StepMetrics`: the time inside each
optimizer step), leaving out the first `warmup` steps. The headline figure is Ray Train with one
worker over the direct trainer (goal: at least 0.9). Each run's memory is sampled from the driver
(`lossaverse.pipeline.bench.measure.PeakRSS`: the driver, the Ray Train workers or the direct trainer's process,
GPU memory where there is a GPU). Needs a running Ray (the caller's `init_ray`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa

from lossaverse.pipeline.bench.measure import PeakRSS, peak_memory, spread
from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.rundir import write_table
from lossaverse.training.config import TrainConfig
from lossaverse.training.flops import extra_forwards, flops_per_token, matmul_peak, mfu
from lossaverse.training.methods import get_method, method_args, peft_config
from lossaverse.training.train import shuffled, train_model

GOAL = 0.9


def synthetic_kto_table(rows: int, seed: int = 0) -> pa.Table:
    """KTO rows for the benchmark: synthetic problems, the stated answer right on even rows."""
    out = {"prompt": [], "completion": [], "label": []}
    for i, p in enumerate(synthetic.problems("train", rows, seed)):
        right = i % 2 == 0
        out["prompt"].append(render(p, template_for("numeric")))
        out["completion"].append(f" {p['solution'] if right else p['solution'].replace(p['reference'], str(int(p['reference']) + 1))}")
        out["label"].append(right)
    return pa.table(out)


def steady_samples_per_second(step_seconds: list[tuple[int, float]], global_batch: int, warmup: int) -> float:
    """Samples/s over the steps after the first `warmup` ones, from per-step timings."""
    steady = [s for _, s in step_seconds[warmup:]]
    if not steady:
        raise ValueError(f"only {len(step_seconds)} steps timed; need more than warmup={warmup}")
    return len(steady) * global_batch / sum(steady)


def direct_samples_per_second(train, model: str, table: pa.Table, seed: int, warmup: int, work: Path) -> float:
    """TRL's trainer in this process, configured exactly like a Ray Train worker."""
    import torch  # deferred: torch loads in seconds
    from datasets import Dataset  # deferred: datasets loads in seconds
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers loads in seconds

    from lossaverse.training.worker import StepMetrics, training_args  # deferred: imports transformers

    torch.set_num_threads(max(1, int(train.cpus_per_worker)))  # what each worker gets
    metrics = StepMetrics(train.per_device_batch_size * train.gradient_accumulation_steps, None)
    t = train.model_dump(mode="json")
    trainer = get_method(train.method).trainer(
        AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        training_args(t, seed, str(work)), method_args(train.method, t),
        Dataset(shuffled(table, seed)), AutoTokenizer.from_pretrained(model), [metrics], peft_config(t["lora"]),
        train=t,
    )
    trainer.train()
    return steady_samples_per_second(metrics.step_seconds, metrics.global_batch, warmup)


def direct_in_subprocess(train, model: str, data: Path, seed: int, warmup: int, work: Path) -> float:
    """`direct_samples_per_second` in a fresh Python process with the environment a Ray worker gets:
    Ray sets OMP_NUM_THREADS to the worker's CPUs, and on CPU that alone changes the speed of
    these tiny steps severalfold, so the baseline must have it too."""
    code = (
        "import json, sys, pyarrow.parquet as pq; from pathlib import Path; "
        "from lossaverse.training.config import TrainConfig; from lossaverse.training.bench import direct_samples_per_second as f; "
        "a = json.loads(sys.argv[1]); "
        "print(json.dumps(f(TrainConfig(**a['train']), a['model'], pq.read_table(a['data']), a['seed'], a['warmup'], Path(a['work']))))"
    )
    args = json.dumps({"train": train.model_dump(mode="json"), "model": model, "data": str(data), "seed": seed,
                       "warmup": warmup, "work": str(work)})
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(train.cpus_per_worker))),
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"direct TRL run failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def ray_samples_per_second(train, model: str, datasets: Path, seed: int, warmup: int, work: Path) -> float:
    train_model(train, model, datasets, work / "model", work / "checkpoints", seed, params=None)
    result = json.loads((work / "checkpoints" / "result.json").read_text())
    return steady_samples_per_second(result["step_seconds"], result["global_batch"], warmup)


def bench_train(model: str = "tiny:small", *, rows: int = 256, steps: int = 100, warmup: int = 5,
                per_device_batch_size: int = 4, workers: tuple[int, ...] = (1, 2),
                deepspeed: tuple[str, ...] = ("none", "zero2"), repeats: int = 2, seed: int = 0,
                lora: dict | None = None, max_length: int = 128) -> dict:
    """Samples/s: TRL direct vs Ray Train (1 worker, no DeepSpeed), and per (workers, deepspeed).

    Each figure is the median over `repeats` runs of `steps` optimizer steps (KTO, fp32 on CPU,
    one CPU thread per worker). Returns {"direct_samples_per_second", "ray_samples_per_second":
    {"<workers>x<deepspeed>": samples/s}, "ray_vs_direct" (median of the per-repeat ratios of
    "1xnone" to direct; 0 when that setting is not measured), "goal", "meets_goal", the settings,
    "spread": {"direct" | "<workers>x<deepspeed>": `lossaverse.pipeline.bench.measure.spread` of the repeats' samples/s},
    "memory": {"direct" | "<workers>x<deepspeed>": the largest `PeakRSS.mib` figures over repeats}}.
    `lora` (the `train.lora` settings, as a dict) trains LoRA adapters on both sides, as the run would.
    """
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    path = resolve_model(model)
    table = synthetic_kto_table(rows, seed)
    base = dict(per_device_batch_size=per_device_batch_size, max_steps=steps, checkpoint_every=0,
                max_length=max_length, logging_steps=steps, max_failures=0, cpus_per_worker=1, lora=lora)
    with tempfile.TemporaryDirectory(prefix="lv-train-bench-") as tmp:
        tmp = Path(tmp)
        write_table(table, tmp / "datasets" / "kto")

        # Repeats are interleaved (direct, then every Ray setting, then again), so a change in the
        # machine's load hits both sides; the ratio is the median of the per-repeat ratios.
        direct, ray = [], {f"{n}x{ds}": [] for ds in deepspeed for n in workers}
        memory: dict[str, list[dict]] = {"direct": [], **{key: [] for key in ray}}
        for i in range(repeats):
            with PeakRSS() as rss:
                direct.append(direct_in_subprocess(
                    TrainConfig(num_workers=1, deepspeed="none", **base), path, tmp / "datasets" / "kto" / "part-0.parquet",
                    seed, warmup, tmp / f"direct{i}"))
            memory["direct"].append(rss.mib())
            for ds in deepspeed:
                for n in workers:
                    with PeakRSS() as rss:
                        ray[f"{n}x{ds}"].append(ray_samples_per_second(
                            TrainConfig(num_workers=n, deepspeed=ds, **base), path, tmp / "datasets", seed, warmup,
                            tmp / f"ray-{n}-{ds}-{i}"))
                    memory[f"{n}x{ds}"].append(rss.mib())
    machine = model_flops(path, table, lora, max_length, base["cpus_per_worker"])
    ratios = [r / d for r, d in zip(ray.get("1xnone", []), direct)]
    ratio = statistics.median(ratios) if ratios else 0.0
    spreads = {"direct": spread(direct), **{k: spread(v) for k, v in ray.items()}}
    return {
        "model": model, "lora": lora, "max_length": max_length, "rows": rows, "steps": steps, "warmup_steps": warmup,
        "per_device_batch_size": per_device_batch_size, "repeats": repeats,
        "direct_samples_per_second": spreads["direct"]["median"],
        "ray_samples_per_second": {k: spreads[k]["median"] for k in ray},
        "ray_vs_direct_per_repeat": [round(r, 3) for r in ratios],
        "ray_vs_direct": round(ratio, 3), "goal": GOAL, "meets_goal": ratio >= GOAL,
        "spread": spreads,
        "memory": {key: peak_memory(runs) for key, runs in memory.items()},
        # Model FLOPs utilisation (lossaverse.training.flops) against the matmul peak of the worker's threads.
        "mfu": {key: machine(spreads[key]["median"]) for key in ("direct", *ray) if spreads[key]["median"]},
        "matmul_peak_flops": machine(None)["peak_flops"],
    }


def model_flops(model: str, table: pa.Table, lora: dict | None, max_length: int, threads: int):
    """samples/s -> `lossaverse.training.flops.mfu` of a KTO run of `model` on `table` (the bench's
    rows; tokens per sample: prompt + completion, cut at max_length), against a matmul peak on
    `threads` threads measured once here; None -> the same dict without a run (the peak alone)."""
    import torch  # deferred: torch loads in seconds
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: transformers loads in seconds


    tokenizer = AutoTokenizer.from_pretrained(model)
    lengths = [min(max_length, len(tokenizer(p + c)["input_ids"])) for p, c in
               zip(table["prompt"].to_pylist(), table["completion"].to_pylist())]
    net = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    params = sum(p.numel() for p in net.parameters())
    lora_params = 0
    if lora:
        from peft import get_peft_model  # deferred: peft loads in seconds

        lora_params = sum(p.numel() for p in get_peft_model(net, peft_config(lora)).parameters() if p.requires_grad)
    per_token = flops_per_token(params, extra_forwards("kto"), lora_params)
    peak = matmul_peak(threads=threads)
    return lambda samples_per_second: mfu(samples_per_second or 0.0, sum(lengths) / len(lengths), per_token, peak)
