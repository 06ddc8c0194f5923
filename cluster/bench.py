"""`lossaverse bench`: each stage against its plain baseline in the same run, on the same inputs.

generate: the full generate stage vs vLLM's offline `LLM.generate` (pipeline.genbench);
mark: the marker's rule path vs math-verify and a plain-Python loop (pipeline.markbench);
train: Ray Train vs TRL's trainer called directly (training.bench).

Output: a console table, `bench.json` (machine, versions, config, per-stage figures and ratios),
`bench_scaling.png` (throughput against scale with the ideal linear line) and a cost model that
turns the measured per-replica throughput into time and accelerator-hours for a given job.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

from cluster.config import RunConfig

STAGES = ("generate", "mark", "train")


def spread(values: list[float]) -> dict:
    """Median and spread of repeated measurements."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "n": len(values)}


def machine() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpus": []}
    try:
        import torch

        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return info


def bench_generate(cfg: RunConfig, prompts: int, replicas: list[int], repeats: int, report: Callable[[str], None]) -> dict:
    """The stage against vLLM offline, and the stage at each replica count. Steady-state tokens/s
    counts from the moment a tenth of the answers are in (past engine start and the first wave);
    start-up is the time to the first answer. The driver's peak RSS at prompts/4 and at prompts
    shows whether it grows with the number of prompts."""
    from pipeline.genbench import bench_items, run_baseline, run_stage
    from pipeline.tinymodels import resolve_model

    ref = cfg.competitors["large"]
    model, engine = resolve_model(ref.path), cfg.engine_for(ref)
    sampling = cfg.generate.sampling.model_copy(update={"samples": 1})
    items = bench_items(prompts, cfg.seed)
    baseline, stage = [], {r: [] for r in replicas}
    for i in range(repeats):
        report(f"bench generate: vLLM LLM.generate, {prompts} prompts (repeat {i + 1}/{repeats})")
        baseline.append(run_baseline(model, engine, items, sampling, cfg.seed))
        for r in replicas:
            report(f"bench generate: the stage with {r} replica(s), {prompts} prompts (repeat {i + 1}/{repeats})")
            stage[r].append(run_stage(model, engine, items, sampling, cfg.seed, r))
    report(f"bench generate: driver memory with {prompts // 4} prompts")
    quarter = run_stage(model, engine, items.slice(0, max(1, prompts // 4)), sampling, cfg.seed, min(replicas))
    scaling = {
        r: {
            "steady_tokens_per_s": spread([s["steady_tokens_per_s"] for s in runs]),
            "tokens_per_s": spread([s["tokens_per_s"] for s in runs]),
            "startup_s": spread([s["startup_s"] for s in runs]),
            "seconds": spread([s["seconds"] for s in runs]),
            "driver_peak_rss_mib": max(s["driver_peak_rss_mib"] for s in runs),
            "workers_peak_rss_mib": max(s["workers_peak_rss_mib"] for s in runs),
        }
        for r, runs in stage.items()
    }
    low, top = min(replicas), max(replicas)
    one = scaling[low]
    base_steady = spread([b["steady_tokens_per_s"] for b in baseline])
    base_e2e = spread([b["tokens_per_s"] for b in baseline])
    return {
        "model": model, "prompts": prompts, "max_tokens": sampling.max_tokens, "engine": engine.model_dump(),
        "baseline": {"steady_tokens_per_s": base_steady, "tokens_per_s": base_e2e,
                     "startup_s": spread([b["startup_s"] for b in baseline])},
        "replicas": scaling,
        "ratio_steady": round(one["steady_tokens_per_s"]["median"] / base_steady["median"], 3),
        "ratio_end_to_end": round(one["tokens_per_s"]["median"] / base_e2e["median"], 3),
        "scaling_efficiency": round(scaling[top]["steady_tokens_per_s"]["median"] * low / (top * one["steady_tokens_per_s"]["median"]), 3),
        "startup_share": round(one["startup_s"]["median"] / one["seconds"]["median"], 3),
        "tokens_per_answer": round(baseline[0]["tokens"] / max(1, baseline[0]["rows"]), 1),
        "memory": {"driver_peak_rss_mib": {"prompts_quarter": quarter["driver_peak_rss_mib"], "prompts_full": one["driver_peak_rss_mib"]},
                   "driver_growth_mib": round(one["driver_peak_rss_mib"] - quarter["driver_peak_rss_mib"], 1)},
    }


def bench_mark_stage(rows: list[int], repeats: int, seed: int, report: Callable[[str], None]) -> dict:
    from pipeline.markbench import bench_mark

    sweep = {}
    for n in rows:
        report(f"bench mark: {n:,} rows")
        sweep[n] = bench_mark(rows=n, repeats=repeats, seed=seed)
    return {"rows": sweep}


def bench_train_stage(cfg: RunConfig, workers: list[int], repeats: int, report: Callable[[str], None]) -> dict:
    """Ray Train (1 worker, DDP) against TRL's trainer called directly, then each worker count with
    DDP over gloo and with ZeRO-2, on the config's target model (training.bench)."""
    from training.bench import bench_train

    report(f"bench train: TRL direct vs Ray Train, workers {workers}, DDP and ZeRO-2")
    raw = bench_train(cfg.target.path, workers=tuple(workers), repeats=max(1, repeats), seed=cfg.seed)
    point = lambda v: {"median": v, "min": v, "max": v, "n": raw["repeats"]}  # noqa: E731  medians from bench_train
    return {
        **raw,
        "baseline": {"samples_per_s": point(raw["direct_samples_per_second"])},
        "workers": {n: {"samples_per_s": point(raw["ray_samples_per_second"][f"{n}xnone"]),
                        "zero2_samples_per_s": point(raw["ray_samples_per_second"].get(f"{n}xzero2", 0.0))}
                    for n in workers},
        "ratio": raw["ray_vs_direct"],
    }


def cost_model(result: dict, cfg: RunConfig, prompts: int, samples: int, replicas: int) -> dict | None:
    """Time and accelerator-hours to generate and mark `prompts` x `samples` answers on `replicas`
    engine replicas, from the measured per-replica steady throughput. An estimate: it assumes the
    benchmark's model, answer length and engine settings, and linear scaling over replicas."""
    gen = result.get("generate")
    if not gen:
        return None
    per_replica = gen["replicas"][min(gen["replicas"])]["steady_tokens_per_s"]["median"] / min(gen["replicas"])
    answers = prompts * samples
    tokens = answers * gen["tokens_per_answer"]
    startup = gen["replicas"][min(gen["replicas"])]["startup_s"]["median"]
    gen_s = startup + tokens / (per_replica * replicas)
    engine = cfg.engine_for(cfg.competitors["large"])
    gpus = replicas * engine.bundles_per_replica * engine.num_gpus
    out = {
        "inputs": {"prompts": prompts, "samples": samples, "replicas": replicas, "tokens_per_answer": gen["tokens_per_answer"],
                   "per_replica_tokens_per_s": round(per_replica, 1), "startup_s": startup, "gpus": gpus},
        "generate_hours": round(gen_s / 3600, 3),
        "gpu_hours": round(gen_s / 3600 * gpus, 3) if gpus else None,
        "replica_hours": round(gen_s / 3600 * replicas, 3),
    }
    mark = result.get("mark")
    if mark:
        largest = mark["rows"][max(mark["rows"])]
        rate = largest["kinds"]["numeric"]["rows_per_s"]["median"]
        out["mark_hours"] = round(answers / rate / 3600, 5)
        out["bottleneck"] = "generate" if gen_s > answers / rate else "mark"
    return out


def plot_scaling(result: dict, path: Path) -> None:
    """Throughput against scale per stage, with the ideal linear line through the smallest scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if "generate" in result:
        g = result["generate"]["replicas"]
        panels.append(("generate: engine replicas", "tokens/s (steady)", [(int(k), v["steady_tokens_per_s"]["median"]) for k, v in g.items()]))
    if "train" in result and result["train"].get("workers"):
        w = result["train"]["workers"]
        panels.append(("train: Ray Train workers", "samples/s", [(int(k), v["samples_per_s"]["median"]) for k, v in w.items()]))
    if "mark" in result:
        m = result["mark"]["rows"]
        panels.append(("mark: rows (numeric)", "rows/s", [(int(k), v["kinds"]["numeric"]["rows_per_s"]["median"]) for k, v in m.items()]))
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, ylabel, points) in zip(axes[0], panels):
        points.sort()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, "o-", label="measured")
        if title.startswith("mark"):
            ax.plot(xs, [ys[0]] * len(xs), "--", label="ideal (constant rate)")
            ax.set_xscale("log")
        else:
            ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "--", label="ideal (linear)")
        ax.set_title(title)
        ax.set_xlabel(title.split(": ")[1])
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(cfg: RunConfig, stages: list[str], out_dir: Path, replicas: list[int], workers: list[int], rows: list[int],
              prompts: int, repeats: int, cost: tuple[int, int, int], report: Callable[[str], None]) -> dict:
    from cluster.stages import _versions

    start = time.perf_counter()
    result: dict = {"machine": machine(), "versions": _versions(), "config": cfg.model_dump(mode="json")}
    if "generate" in stages:
        result["generate"] = bench_generate(cfg, prompts, replicas, repeats, report)
    if "mark" in stages:
        result["mark"] = bench_mark_stage(rows, repeats, cfg.seed, report)
    if "train" in stages:
        result["train"] = bench_train_stage(cfg, workers, repeats, report)
    result["cost"] = cost_model(result, cfg, *cost)
    result["seconds"] = round(time.perf_counter() - start, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    from pipeline.rundir import write_json

    write_json(result, out_dir / "bench.json")
    plot_scaling(result, out_dir / "bench_scaling.png")
    return result
