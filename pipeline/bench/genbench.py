"""Benchmark of the generate stage against vLLM's own offline `LLM.generate`, in one run.

Both sides get the same model, the same rendered prompts, the same per-request sampling
parameters (seeds included), the same engine arguments and the same scheduler limits (vLLM's
`LLM` class has other defaults than the async engine the stage runs: `stage_scheduler_limits`);
the baseline runs in a Ray task with the CPUs of one engine replica. Both build their engine
arguments with `lossaverse.pipeline.generation.processors.engine_kwargs`, the stage's own builder (on CPU: chunked
prefill off). The stage is measured whole: Ray Data, the processor, the answer shards written as
Parquet. Start-up is reported apart from steady-state throughput, and `lossaverse.pipeline.bench.measure.PeakRSS`
samples the memory of the driver and of the workers during each run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from lossaverse.pipeline.bench.measure import PeakRSS
from lossaverse.pipeline.generation.generate import Competitor, PromptStyle, expand_requests
from lossaverse.pipeline.generation.kvcache import read_hf_config
from lossaverse.pipeline.generation.processors import engine_env, engine_kwargs, engine_threads
from lossaverse.pipeline.generation.shards import generate_sharded


def stage_scheduler_limits(model: str, engine_kwargs: dict) -> dict:
    """The `max_num_seqs` and `max_num_batched_tokens` the stage's engine runs with. Ray Data LLM
    builds its engine from `AsyncEngineArgs(...).create_engine_config()`, whose defaults differ
    from those of vLLM's `LLM` class (on CPU 128 sequences and 2048 tokens a step against 256 and
    4096), so the baseline is given these explicitly."""
    from vllm import AsyncEngineArgs  # deferred: vLLM loads in seconds

    scheduler = AsyncEngineArgs(model=model, **engine_kwargs).create_engine_config().scheduler_config
    return {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens}


def _vllm_offline(model: str, engine_kwargs: dict, prompts: list[str], params: list[dict], warmup: int) -> dict:
    """vLLM's own offline path, cold: import, LLM(...) with the stage's scheduler limits, a warm-up
    LLM.generate on the first `warmup` prompts, then one timed LLM.generate over every prompt."""
    t0 = time.perf_counter()
    engine_threads()  # the stage's engine threads (its engine actors call it too)
    from vllm import LLM, SamplingParams  # deferred: vLLM loads in seconds

    limits = stage_scheduler_limits(model, engine_kwargs)
    llm = LLM(model=model, **{**limits, **engine_kwargs})
    t1 = time.perf_counter()
    llm.generate(prompts[:warmup], [SamplingParams(**p) for p in params[:warmup]], use_tqdm=False)
    t2 = time.perf_counter()
    outputs = llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
    t3 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"rows": len(outputs), "tokens": tokens, "engine_s": round(t1 - t0, 2), "warmup_s": round(t2 - t1, 2),
            "generate_s": round(t3 - t2, 2), "steady_tokens_per_s": round(tokens / (t3 - t2), 1),
            "scheduler_limits": limits}


def run_baseline(model: str, engine, items, sampling, seed: int) -> dict:
    """vLLM offline on the stage's requests. End to end it is timed like the stage, from the
    driver: Ray starting the task, importing vLLM, loading the engine and generating; the warm-up
    pass is left out, as the stage has none. start-up = that time less the timed generate."""
    import ray  # deferred: Ray loads in seconds


    requests = expand_requests(items, "baseline", model, sampling, seed)
    # max_calls=1: the worker process exits with the task, and its engine processes with it; a kept
    # worker holds the engine's busy processes alive and slows the stage measured after it.
    # The engine's environment too (its CPU thread binding), as the stage's engine actors get it.
    env = {"runtime_env": {"env_vars": e}} if (e := engine_env(engine)) else {}
    task = ray.remote(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus, max_calls=1, **env)(_vllm_offline)
    start = time.perf_counter()
    with PeakRSS() as rss:
        out = ray.get(task.remote(model, engine_kwargs(engine, hf_config=read_hf_config(model)), [r["prompt"] for r in requests],
                                  [r["sampling_params"] for r in requests], min(len(requests), engine.batch_size)))
    seconds = time.perf_counter() - start - out["warmup_s"]
    return {**out, "seconds": round(seconds, 2), "startup_s": round(seconds - out["generate_s"], 2),
            "tokens_per_s": round(out["tokens"] / seconds, 1), "memory": rss.mib()}


def run_stage(model: str, engine, items, sampling, seed: int, replicas: int, shard_items: int) -> dict:
    """The generate stage for one competitor with `replicas` engine replicas and answer shards of
    `shard_items` items (generate.shard_items: each shard is one input block), into a scratch dir.

    Returns `lossaverse.pipeline.generation.shards.Tally.summary` (rows, tokens, start-up, steady state from batch
    completions) plus `engines`, the most engine replicas seen running at once (Ray Data's actor
    pool for `concurrency: n` scales from 1 to n, so fewer than asked may run), `memory`
    (`PeakRSS.mib`) and `driver_growth_mib`: the driver's peak RSS
    after a quarter of the answers were in less its peak before, over the last three quarters of
    the rows (a driver that kept rows would grow by their size; a streaming one stays flat)."""
    scratch = Path(tempfile.mkdtemp(prefix="lv-bench-gen-"))
    competitor = Competitor("bench", model, engine=engine.model_copy(update={"concurrency": replicas}))
    try:
        with PeakRSS(count_title="vLLMEngineStageUDF") as rss:
            totals = generate_sharded(items, [competitor], sampling, PromptStyle(), seed, scratch / "answers.shards",
                                      scratch / "answers", f"bench-{replicas}", shard_items,
                                      lambda line: None, 1e9)
        out = totals["bench"]
        before, after = rss.driver_at(rss.start + out.pop("quarter_s"))
        return {**out, "memory": rss.mib(), "driver_growth_mib": round((after - before) / 2**20, 1), "engines": rss.count,
                "driver_cpu_s": round(rss.driver_cpu_s, 1)}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
