"""Benchmark of the generate stage against vLLM's own offline `LLM.generate`, in one run.

Both sides get the same model, the same rendered prompts, the same per-request sampling
parameters (seeds included) and the same engine arguments; the baseline runs in a Ray task with
the CPUs of one engine replica. The stage is measured whole: Ray Data, the processor, the answer
shards written as Parquet. Start-up (engine load until the first answer) is reported apart from
steady-state throughput, and the driver's peak RSS is sampled to show it does not grow with the
number of prompts.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.compute as pc


class PeakRSS:
    """Peak resident memory of this process (the driver) and, summed, of its descendants (the
    embedded Ray's workers), sampled every `interval` seconds while the block runs."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver = 0
        self.workers = 0
        self._stop = threading.Event()

    def _sample(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self.driver = max(self.driver, me.memory_info().rss)
                total = 0
                for child in me.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        continue
                self.workers = max(self.workers, total)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def mib(self) -> dict:
        return {"driver_peak_rss_mib": round(self.driver / 2**20, 1), "workers_peak_rss_mib": round(self.workers / 2**20, 1)}


def bench_items(n: int, seed: int):
    from cluster.config import BenchmarkConfig
    from pipeline.benchmarks import load_items

    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed)
    return items.filter(pc.equal(items["split"], "train"))


def _vllm_offline(model: str, engine_kwargs: dict, prompts: list[str], params: list[dict], warmup: int) -> dict:
    """vLLM's own offline path: LLM(...), a warm-up LLM.generate on the first `warmup` prompts,
    then one timed LLM.generate over every prompt."""
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=model, **engine_kwargs)
    t1 = time.perf_counter()
    llm.generate(prompts[:warmup], [SamplingParams(**p) for p in params[:warmup]], use_tqdm=False)
    t2 = time.perf_counter()
    outputs = llm.generate(prompts, [SamplingParams(**p) for p in params], use_tqdm=False)
    t3 = time.perf_counter()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"rows": len(outputs), "tokens": tokens, "startup_s": round(t1 - t0, 2), "generate_s": round(t3 - t2, 2),
            "tokens_per_s": round(tokens / (t1 - t0 + t3 - t2), 1), "steady_tokens_per_s": round(tokens / (t3 - t2), 1)}


def run_baseline(model: str, engine, items, sampling, seed: int) -> dict:
    import ray

    from pipeline.generate import PromptStyle, engine_kwargs, expand_requests

    requests = expand_requests(items, "baseline", model, sampling, None, seed, style=PromptStyle())
    task = ray.remote(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus)(_vllm_offline)
    return ray.get(task.remote(model, engine_kwargs(engine), [r["prompt"] for r in requests],
                               [r["sampling_params"] for r in requests], max(1, len(requests) // 4)))


def run_stage(model: str, engine, items, sampling, seed: int, replicas: int) -> dict:
    """The generate stage for one competitor with `replicas` engine replicas, into a scratch dir."""
    from pipeline.generate import Competitor, PromptStyle
    from pipeline.shards import generate_sharded

    scratch = Path(tempfile.mkdtemp(prefix="lv-bench-gen-"))
    competitor = Competitor("bench", model, engine=engine.model_copy(update={"concurrency": replicas}))
    try:
        with PeakRSS() as rss:
            totals = generate_sharded(items, [competitor], sampling, PromptStyle(), seed, scratch / "answers.shards",
                                      scratch / "answers", f"bench-{replicas}", max(1, items.num_rows // 16),
                                      lambda line: None, 1e9)
        return {**totals["bench"], **rss.mib()}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
