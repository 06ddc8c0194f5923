"""`lossaverse bench`: each stage against its plain baseline in the same run, on the same inputs.

generate: the full generate stage vs vLLM's offline `LLM.generate` (lossaverse.pipeline.bench.genbench);
mark: the marker's rule path vs math-verify and a plain-Python loop (lossaverse.pipeline.bench.markbench);
train: Ray Train vs TRL's trainer called directly (lossaverse.training.bench).

Every stage also reports its memory: peak RSS of the driver and of the workers, GPU memory where
there is a GPU (None on CPU), and a check that the driver does not grow with the number of rows.

Output: a console table, `bench.json` (machine, versions, config, per-stage figures and ratios),
`bench_scaling.png` (throughput against scale with the ideal linear line) and a cost model that
turns the measured per-replica throughput into time and accelerator-hours for a given job.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import psutil
import pyarrow.compute as pc
from rich.table import Table

from lossaverse.cluster.config import BenchmarkConfig, RunConfig
from lossaverse.pipeline.bench.genbench import run_baseline, run_stage
from lossaverse.pipeline.bench.markbench import bench_mark
from lossaverse.pipeline.bench.measure import PeakRSS, nvml, peak_memory, ratio, spread
from lossaverse.pipeline.bench.plots import plot_scaling
from lossaverse.pipeline.data.rundir import write_json
from lossaverse.pipeline.generation.kvcache import read_hf_config
from lossaverse.pipeline.generation.processors import engine_kwargs
from lossaverse.pipeline.generation.shards import MIN_WAVES
from lossaverse.pipeline.sources.benchmarks import load_items
from lossaverse.training.bench import bench_train

STAGES = ("generate", "mark", "train")


def machine() -> dict:
    """This machine: platform, CPUs, memory, GPUs (by NVML, so the driver does not import torch
    and its memory figures stay its own) and the load average when the bench starts."""
    pynvml = nvml()
    gpus = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(pynvml.nvmlDeviceGetCount())] if pynvml else []
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "gpus": [str(g) for g in gpus],
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def default_prompts(engine) -> int:
    """Prompts per engine replica: 2 x (MIN_WAVES + 1) rounds of the batches a replica holds at once
    (`batch_size` x `max_concurrent_batches`). `lossaverse.pipeline.generation.shards.steady_state`
    needs MIN_WAVES + 1 waves of completions; the batches in flight together tend to complete
    together (the default job's 8 batches of 8 on 64 prompts made one wave), and twice that leaves
    a margin and a window of several seconds to time (384 prompts, 6 rounds, measured it)."""
    return 2 * (MIN_WAVES + 1) * engine.batch_size * engine.max_concurrent_batches


def _replica_figures(runs: list[dict], hint: str) -> dict:
    """The repeats of the stage at one replica count: spreads, and the steady-state tokens/s only
    when every repeat measured it (otherwise None and the reason, plus `hint`)."""
    notes = [r["steady_note"] for r in runs if r["steady_tokens_per_s"] is None]
    return {
        "steady_tokens_per_s": None if notes else spread([r["steady_tokens_per_s"] for r in runs]),
        "steady_note": notes[0] + hint if notes else None, "batches": runs[0]["batches"],
        "steady_waves": min(r["steady_waves"] for r in runs), "wave_ends_s": runs[0]["wave_ends_s"],
        "tokens_per_s": spread([r["tokens_per_s"] for r in runs]), "startup_s": spread([r["startup_s"] for r in runs]),
        "seconds": spread([r["seconds"] for r in runs]), "tokens": runs[0]["tokens"],
        "engines_running": min(r["engines"] for r in runs), "driver_cpu_s": spread([r["driver_cpu_s"] for r in runs]),
        "memory": peak_memory([r["memory"] for r in runs]),
    }


def bench_items(n: int, seed: int):
    """`n` train items of the built-in synthetic benchmark: the prompts of the generate bench."""
    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed)
    return items.filter(pc.equal(items["split"], "train"))


def bench_generate(cfg: RunConfig, prompts: int | None, replicas: list[int], repeats: int, report: Callable[[str], None]) -> dict:
    """The stage against vLLM offline, and the stage at each replica count.

    `prompts` is per replica (default `default_prompts`): the stage with r replicas answers
    r x prompts, so every replica has the same number of batches at every scale; the baseline, one
    engine, answers the prompts of the smallest replica count, the same requests as that run.
    Steady-state tokens/s comes from the engine batches' completion times (lossaverse.pipeline.generation.shards.
    steady_state: the waves after the first); a figure measured on too few waves is None with a
    note. Start-up is the time to the first answer. Memory: `PeakRSS` per run, and the driver's
    growth over the last three quarters of the rows. `engine_kwargs`: the vLLM engine arguments
    both sides ran with, from the stage's builder (`lossaverse.pipeline.generation.processors.engine_kwargs`)."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    ref = cfg.competitors["large"]
    model, engine = resolve_model(ref.path), cfg.engine_for(ref)
    sampling = cfg.generate.sampling.model_copy(update={"samples": 1})
    needed = default_prompts(engine)
    prompts = prompts or needed
    if prompts < needed:
        report(f"bench generate: {prompts} prompts per replica are fewer than {needed} ({needed // engine.batch_size} "
               f"batches of {engine.batch_size}); steady-state figures measured on too few batches are left out")
    low, top = min(replicas), max(replicas)
    items = {r: bench_items(prompts * r, cfg.seed) for r in replicas}
    baseline, stage = [], {r: [] for r in replicas}
    for i in range(repeats):
        report(f"bench generate: vLLM LLM.generate, {prompts * low} prompts (repeat {i + 1}/{repeats})")
        baseline.append(run_baseline(model, engine, items[low], sampling, cfg.seed))
        for r in replicas:
            report(f"bench generate: the stage with {r} replica(s), {prompts * r} prompts (repeat {i + 1}/{repeats})")
            stage[r].append(run_stage(model, engine, items[r], sampling, cfg.seed, r, cfg.generate.shard_items))
    hint = f" (the default, {needed} prompts per replica, gives {needed // engine.batch_size} batches each)" if prompts < needed else ""
    scaling = {r: _replica_figures(runs, hint) for r, runs in stage.items()}
    one = scaling[low]
    base_steady = spread([b["steady_tokens_per_s"] for b in baseline])
    base_e2e = spread([b["tokens_per_s"] for b in baseline])

    def per_replica(r):
        s = scaling[r]["steady_tokens_per_s"]
        return s["median"] / r if s else None

    for r in replicas:
        scaling[r]["efficiency"] = ratio(per_replica(r), per_replica(low))
    growth = max(s["driver_growth_mib"] for s in stage[low])  # the largest over repeats
    return {
        "model": model, "prompts_per_replica": prompts, "prompts_per_replica_needed": needed, "max_tokens": sampling.max_tokens,
        "engine": engine.model_dump(), "engine_kwargs": engine_kwargs(engine, hf_config=read_hf_config(model)), "scheduler_limits": baseline[0]["scheduler_limits"],
        "baseline": {"steady_tokens_per_s": base_steady, "tokens_per_s": base_e2e,
                     "startup_s": spread([b["startup_s"] for b in baseline]),
                     "engine_s": spread([b["engine_s"] for b in baseline]),
                     "generate_s": spread([b["generate_s"] for b in baseline]), "tokens": baseline[0]["tokens"],
                     "rows": baseline[0]["rows"], "memory": peak_memory([b["memory"] for b in baseline])},
        # Same prompts, seeds and token budget on both sides: the answers' total tokens should match
        # (seeded sampling; within 1% allows for batch-dependent floating-point ties).
        "same_work": {"rows": [baseline[0]["rows"], stage[low][0]["rows"]],
                      "tokens": [baseline[0]["tokens"], stage[low][0]["tokens"]],
                      "match": baseline[0]["rows"] == stage[low][0]["rows"]
                      and abs(baseline[0]["tokens"] - stage[low][0]["tokens"]) <= 0.01 * baseline[0]["tokens"]},
        "replicas": scaling,
        # per replica: the baseline is one engine
        "ratio_steady": ratio(per_replica(low), base_steady["median"]),
        "ratio_end_to_end": ratio(one["tokens_per_s"]["median"], base_e2e["median"]),
        "scaling_efficiency": scaling[top]["efficiency"],
        "startup_share": ratio(one["startup_s"]["median"], one["seconds"]["median"]),
        "tokens_per_answer": round(baseline[0]["tokens"] / max(1, baseline[0]["rows"]), 1),
        "memory": {**peak_memory([v["memory"] for v in scaling.values()] + [peak_memory([b["memory"] for b in baseline])]),
                   "growth": {"process": "driver", "mib": growth, "rows": prompts * low - prompts * low // 4}},
    }


def bench_mark_stage(rows: list[int], repeats: int, seed: int, report: Callable[[str], None]) -> dict:
    """lossaverse.pipeline.bench.markbench at each row count. Memory: the bench process (it marks whole in-memory
    tables) as the driver; as the worker, a fresh process marking the rows in streamed batches
    like a pipeline worker (its exact peak, `peak_rss_bytes`); no GPU is used. The growth check:
    that worker's peak at rows and at rows/10 (the rows stream through it as through the driver
    of a pipeline run)."""
    sweep, driver = {}, []
    for n in rows:
        report(f"bench mark: {n:,} rows")
        with PeakRSS() as rss:
            sweep[n] = bench_mark(rows=n, repeats=repeats, seed=seed)
        driver.append(rss.mib()["driver_peak_rss_mib"])
    top = sweep[max(rows)]
    worker = round(max(top["peak_rss_bytes"].values()) / 2**20, 1)
    return {"rows": sweep, "memory": {"driver_peak_rss_mib": max(driver), "workers_peak_rss_mib": worker,
                                      "worker_max_rss_mib": worker, "gpu_peak_mib": None,
                                      "growth": {"process": "marking worker", "mib": round(top["peak_rss_growth_mib"], 1),
                                                 "rows": max(rows) - max(1, max(rows) // 10)}}}


def bench_train_stage(cfg: RunConfig, workers: list[int], repeats: int, report: Callable[[str], None],
                      steps: int = 100) -> dict:
    """Ray Train (1 worker, DDP) against TRL's trainer called directly, then each worker count with
    DDP over gloo and with ZeRO-2, on the config's target model (lossaverse.training.bench), with the config's
    LoRA settings and max_length, for `steps` optimizer steps each."""
    lora = cfg.train.lora.model_dump(mode="json") if cfg.train.lora else None
    report(f"bench train: TRL direct vs Ray Train, workers {workers}, DDP and ZeRO-2{', LoRA' if lora else ''}, {steps} steps")
    raw = bench_train(cfg.target.path, workers=tuple(workers), repeats=max(1, repeats), seed=cfg.seed, steps=steps,
                      lora=lora, max_length=cfg.train.max_length)
    unmeasured = {"median": 0.0, "min": 0.0, "max": 0.0, "n": 0}
    return {
        **raw,
        "baseline": {"samples_per_s": raw["spread"]["direct"], "memory": raw["memory"]["direct"]},
        "workers": {n: {"samples_per_s": raw["spread"][f"{n}xnone"],
                        "zero2_samples_per_s": raw["spread"].get(f"{n}xzero2", unmeasured),
                        "memory": raw["memory"][f"{n}xnone"], "zero2_memory": raw["memory"].get(f"{n}xzero2")}
                    for n in workers},
        "ratio": raw["ray_vs_direct"],
        "memory_by_run": raw["memory"],  # "direct" (TRL in one process) and "<workers>x<deepspeed>"
        "memory": peak_memory(list(raw["memory"].values())),
    }


def cost_model(result: dict, cfg: RunConfig, prompts: int, samples: int, replicas: int) -> dict | None:
    """Time and accelerator-hours to generate and mark `prompts` x `samples` answers on `replicas`
    engine replicas, from the measured per-replica steady throughput. An estimate: it assumes the
    benchmark's model, answer length and engine settings, and linear scaling over replicas. None
    without a generate result; a note instead of figures when its steady rate could not be measured."""
    gen = result.get("generate")
    if not gen:
        return None
    low = min(gen["replicas"])
    steady = gen["replicas"][low]["steady_tokens_per_s"]
    if steady is None:
        return {"note": "no cost estimate: the steady-state rate was not measured (" + gen["replicas"][low]["steady_note"] + ")"}
    per_replica = steady["median"] / low
    answers = prompts * samples
    tokens = answers * gen["tokens_per_answer"]
    startup = gen["replicas"][low]["startup_s"]["median"]
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


def _mib(v) -> str:
    return "n/a" if v is None else f"{v:,.0f}"


def _memory_rows(table, stage: str, memory: dict) -> None:
    table.add_row(stage, "memory MiB: driver / workers (largest) / GPU",
                  f"{_mib(memory['driver_peak_rss_mib'])} / {_mib(memory['workers_peak_rss_mib'])} "
                  f"({_mib(memory['worker_max_rss_mib'])}) / {_mib(memory['gpu_peak_mib'])}", "", "")
    growth = memory.get("growth")
    if growth:
        table.add_row(stage, f"{growth['process']} RSS growth MiB over {growth['rows']:,} more rows", f"{growth['mib']:+.1f}", "", "")


def bench_table(result: dict):
    """The headline figures of `bench.json` as a rich table: each stage against its baseline, its
    scaling, its memory. A steady-state figure that could not be measured reads "n/a" and the
    reason is in the caption."""
    notes = []
    table = Table(title="lossaverse bench")
    for column in ("stage", "measure", "value", "baseline", "ratio"):
        table.add_column(column, justify="left" if column in ("stage", "measure") else "right")
    if "generate" in result:
        g = result["generate"]
        low = min(g["replicas"], key=int)
        one = g["replicas"][low]
        ratio = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        steady = lambda v: "n/a" if v["steady_tokens_per_s"] is None else f"{v['steady_tokens_per_s']['median']:,.0f}"  # noqa: E731
        table.add_row("generate", f"tokens/s steady ({low} replica)", steady(one),
                      f"{g['baseline']['steady_tokens_per_s']['median']:,.0f}", ratio(g["ratio_steady"]))
        table.add_row("generate", "tokens/s end to end (start-up included)", f"{one['tokens_per_s']['median']:,.0f}",
                      f"{g['baseline']['tokens_per_s']['median']:,.0f}", ratio(g["ratio_end_to_end"]))
        table.add_row("generate", "start-up s (stage: to the first answer)", f"{one['startup_s']['median']:.1f}",
                      f"{g['baseline']['startup_s']['median']:.1f}", "")
        table.add_row("generate", "answers / tokens (same prompts and budget)",
                      f"{g['same_work']['rows'][1]:,} / {g['same_work']['tokens'][1]:,}",
                      f"{g['same_work']['rows'][0]:,} / {g['same_work']['tokens'][0]:,}", "")
        if not g["same_work"].get("match", True):
            notes.append("generate: the stage and vLLM offline did not produce the same answers and tokens; "
                         "the ratios compare different work")
        for r, v in g["replicas"].items():
            eff = "" if v.get("efficiency") is None else f"{v['efficiency']:.2f}"
            ran = f", {v['engines_running']} ran" if v.get("engines_running") not in (None, int(r)) else ""
            table.add_row("generate", f"{r} replica(s){ran}: steady tokens/s, {v['batches']} batches", steady(v), "", eff)
            if v["steady_note"]:
                notes.append(f"generate, {r} replica(s): {v['steady_note']}")
        table.add_row("generate", f"scaling efficiency at {max(g['replicas'], key=int)} replicas", ratio(g["scaling_efficiency"]), "", "")
        _memory_rows(table, "generate", g["memory"])
    if "mark" in result:
        for n, m in result["mark"]["rows"].items():
            for kind, k in m["kinds"].items():
                table.add_row("mark", f"{kind} rows/s ({int(n):,} rows)", f"{k['rows_per_s']['median']:,.0f}", "", "")
            if "baseline" in m:
                table.add_row("mark", f"numeric vs math-verify rows/s ({int(n):,} rows)", "",
                              f"{m['baseline']['rows_per_s']['median']:,.0f}", f"{m.get('ratio', 0):.0f}")
            if "worst_row_s" in m:
                worst = max(m["worst_row_s"].values())
                table.add_row("mark", "worst per-row ms: generated rows / hostile text (CPU)",
                              f"{worst * 1000:.1f} / {m['hostile']['cpu_s'] * 1000:.1f}", "", "")
            if "suite" in m:
                su = m["suite"]
                table.add_row("mark", f"agreement with a grader, real-format suite ({su['rows']} rows)",
                              f"{su['rules']['agreement']:.3f}", f"{su['math_verify']['agreement']:.3f}", "")
                for d in su["disagreements"]:
                    notes.append(f"mark suite {d['id']}: grader {d['grader']}, rules {d['rules']}, math-verify {d['math_verify']}: {d['why']}")
            if "math_verify_suite" in m:
                mv = m["math_verify_suite"]
                table.add_row("mark", f"agreement with math-verify's tests ({mv['graded']} rows, {mv['excluded']} excluded), "
                              f"false positives {len(mv['false_positives'])}", f"{mv['agreement']:.3f}", "", "")
                for d in mv["disagreements"]:
                    notes.append(f"mark math-verify suite {d['id']}: expected {d['correct']}, rules {d['rules']} ({d['source']})")
        _memory_rows(table, "mark", result["mark"]["memory"])
    if "train" in result:
        t = result["train"]
        for w, v in (t.get("workers") or {}).items():
            table.add_row("train", f"samples/s, {w} worker(s), DDP / ZeRO-2",
                          f"{v['samples_per_s']['median']:.1f} / {v['zero2_samples_per_s']['median']:.1f}", "", "")
        if "ratio" in t:
            table.add_row("train", "Ray Train (1 worker) vs TRL direct", f"{t['ray_samples_per_second'].get('1xnone', 0):.1f}",
                          f"{t['baseline']['samples_per_s']['median']:.1f}", f"{t['ratio']:.2f}")
        if (m := (t.get("mfu") or {}).get("1xnone")) and (d := t["mfu"].get("direct")):
            table.add_row("train", f"GFLOP/s (KTO, {m['tokens_per_sample']:g} tokens/sample) vs the fp32 matmul peak "
                          f"{m['peak_flops'] / 1e9:.1f}: MFU, Ray Train (1 worker) / TRL direct",
                          f"{m['achieved_flops'] / 1e9:.2f} ({m['mfu']:.1%})", f"{d['achieved_flops'] / 1e9:.2f} ({d['mfu']:.1%})", "")
        _memory_rows(table, "train", t["memory"])
    cost = result.get("cost")
    if cost and "note" in cost:
        notes.append(cost["note"])
    elif cost:
        i = cost["inputs"]
        table.add_row("cost", f"estimate: generate {i['prompts']:,} x {i['samples']} on {i['replicas']} replicas",
                      f"{cost['generate_hours']:.3f} h", "", "")
        if "bottleneck" in cost:
            table.add_row("cost", "bottleneck", cost["bottleneck"], "", "")
    if notes:
        table.caption = "\n".join(notes)
    return table


def run_bench(cfg: RunConfig, stages: list[str], out_dir: Path, replicas: list[int], workers: list[int], rows: list[int],
              prompts: int | None, repeats: int, cost: tuple[int, int, int], report: Callable[[str], None],
              train_steps: int = 100) -> dict:
    """Each stage in `stages`, then the cost model; writes bench.json and bench_scaling.png into
    `out_dir` and returns what bench.json holds. `stage_seconds` is each stage's wall time and
    `load_average_end` the machine's load when done (other work on the machine slows every figure)."""
    from lossaverse.cluster.stages import versions  # deferred: imports pandas

    start = time.perf_counter()
    result: dict = {"machine": machine(), "versions": versions(), "config": cfg.model_dump(mode="json"), "stage_seconds": {}}
    benches = {"generate": lambda: bench_generate(cfg, prompts, replicas, repeats, report),
               "mark": lambda: bench_mark_stage(rows, repeats, cfg.seed, report),
               "train": lambda: bench_train_stage(cfg, workers, repeats, report, train_steps)}
    for stage in STAGES:
        if stage in stages:
            began = time.perf_counter()
            result[stage] = benches[stage]()
            result["stage_seconds"][stage] = round(time.perf_counter() - began, 1)
    result["cost"] = cost_model(result, cfg, *cost)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(result, out_dir / "bench.json")
    plot_scaling(result, out_dir / "bench_scaling.png")
    return result
