"""Benchmark of the generate stage against vLLM's own offline `LLM.generate`, in one run.

Both sides get the same model, the same rendered prompts, the same per-request sampling
parameters (seeds included), the same engine arguments and the same scheduler limits (vLLM's
`LLM` class has other defaults than the async engine the stage runs: `stage_scheduler_limits`);
the baseline runs in a Ray task with the CPUs of one engine replica. The stage is measured whole: Ray Data, the processor, the
answer shards written as Parquet. Start-up is reported apart from steady-state throughput, and
`PeakRSS` samples the memory of the driver and of the workers during each run.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.compute as pc

# Worker processes of Ray that run no task or actor of ours.
RAY_IDLE = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _gpu_memory_by_pid() -> dict[int, int] | None:
    """GPU memory held by each process on this machine (NVML), or None without a GPU. NVML reads
    it from outside the process, which is what is needed here: the memory is held by processes
    this code does not run (vLLM's engine core, Ray Train workers), so the allocator's own counter
    (`torch.cuda.max_memory_allocated`) is out of reach; NVML's figure also counts the CUDA
    context and the allocator's cache, i.e. what the device has to hold."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: a CPU machine
        return None
    used: dict[int, int] = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
            used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
    return used


class PeakRSS:
    """Peak memory while the block runs, sampled every `interval` seconds.

    driver: this process's RSS. workers: the summed RSS of the worker processes under this driver
    (the Ray workers of its embedded Ray that run a task or an actor, and child processes it started
    itself, e.g. a subprocess baseline), each with its own children such as vLLM's engine core;
    worker_max: the largest one of them. gpu: GPU memory held by the driver and those workers
    (NVML), None on a machine without a GPU. RSS counts shared pages in every process that maps
    them, so the sum is an upper bound. Ray's own services (GCS, raylet, agents, idle workers) are
    left out, and so are workers already busy when the block starts (Ray Data's long-lived actors,
    an engine of an earlier run still shutting down): they belong to what ran before. The workers
    of a remote cluster are not visible from here: `workers` stays None.
    `driver_cpu_s`: the driver's CPU time (user + system) in the block.
    `driver_at(t)` gives the driver's peak RSS up to and after a moment, for the growth check; the
    last sample is taken as the block ends. `count`: the most workers whose process title contains
    `count_title` alive at one time (e.g. the engine replicas that actually ran).
    """

    def __init__(self, interval: float = 0.5, count_title: str | None = None):
        self.interval = interval
        self.count_title = count_title
        self.count = 0
        self.driver = 0
        self.workers: int | None = None
        self.worker_max: int | None = None
        self.gpu: int | None = None
        self.samples: list[tuple[float, int]] = []  # (perf_counter, driver RSS)
        self._before: set[int] = set()  # workers busy when the block started
        self._stop = threading.Event()

    @staticmethod
    def _title(proc) -> str:
        import psutil

        try:
            cmd = proc.cmdline()
        except psutil.Error:
            return ""
        return cmd[0] if cmd else ""

    def _worker_roots(self, me) -> list:
        import psutil

        roots = []
        for child in me.children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            title = cmd[0] if cmd else ""
            ours = child.ppid() == me.pid and not any("site-packages/ray/" in c or "resource_tracker" in c for c in cmd)
            if ((title.startswith("ray::") and not title.startswith(RAY_IDLE)) or ours) and child.pid not in self._before:
                roots.append(child)
        return roots

    def _sample_once(self, me) -> None:
        import psutil

        now = me.memory_info().rss
        self.driver = max(self.driver, now)
        self.samples.append((time.perf_counter(), now))
        sizes, pids = [], {me.pid}
        roots = self._worker_roots(me)
        if self.count_title:
            self.count = max(self.count, sum(self._title(r).find(self.count_title) >= 0 for r in roots))
        for root in roots:
            try:
                tree = [root, *root.children(recursive=True)]
                size = 0
                for proc in tree:
                    size += proc.memory_info().rss
                    pids.add(proc.pid)
                sizes.append(size)
            except psutil.Error:
                continue
        if sizes:
            self.workers = max(self.workers or 0, sum(sizes))
            self.worker_max = max(self.worker_max or 0, max(sizes))
        gpu = _gpu_memory_by_pid()
        if gpu is not None:
            self.gpu = max(self.gpu or 0, sum(v for pid, v in gpu.items() if pid in pids))

    def _run(self):
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self._sample_once(me)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        import psutil

        self.start = time.perf_counter()
        self._cpu = sum(psutil.Process().cpu_times()[:2])
        self._before = {p.pid for p in self._worker_roots(psutil.Process())}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import psutil

        self._stop.set()
        self._thread.join()
        try:
            self._sample_once(psutil.Process())  # the state at the end, however short the block
        except psutil.Error:
            pass
        self.driver_cpu_s = sum(psutil.Process().cpu_times()[:2]) - self._cpu

    def driver_at(self, moment: float) -> tuple[int, int]:
        """The driver's peak RSS (bytes) up to `moment` (a perf_counter time) and after it."""
        before = [rss for t, rss in self.samples if t <= moment]
        after = [rss for t, rss in self.samples if t > moment]
        return max(before, default=0), max(after, default=0)

    def mib(self) -> dict:
        mib = lambda v: None if v is None else round(v / 2**20, 1)  # noqa: E731
        return {"driver_peak_rss_mib": mib(self.driver), "workers_peak_rss_mib": mib(self.workers),
                "worker_max_rss_mib": mib(self.worker_max), "gpu_peak_mib": mib(self.gpu)}


def bench_items(n: int, seed: int):
    from cluster.config import BenchmarkConfig
    from pipeline.benchmarks import load_items

    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed)
    return items.filter(pc.equal(items["split"], "train"))


def unsplit_prefill(engine):
    """The engine settings with prompts never split across engine steps on CPU.

    vLLM's CPU build fails on a seeded request whose prompt prefill is split ("CPU Generator does
    not use offset"; every request here is seeded): the engine dies and Ray Data restarts it, which
    costs a minute and lands inside the measurement. With chunked prefill off, the scheduler waits
    for the next step instead of splitting a prompt; a step's token budget must then hold the
    longest prompt, so it is raised to max_model_len where that is more than vLLM's CPU default
    (2048). On GPU nothing changes.
    """
    if engine.num_gpus or "enable_chunked_prefill" in engine.engine_kwargs:
        return engine
    extra = {"enable_chunked_prefill": False}
    if engine.max_model_len > 2048 and "max_num_batched_tokens" not in engine.engine_kwargs:
        extra["max_num_batched_tokens"] = engine.max_model_len
    return engine.model_copy(update={"engine_kwargs": {**engine.engine_kwargs, **extra}})


def stage_scheduler_limits(model: str, engine_kwargs: dict) -> dict:
    """The `max_num_seqs` and `max_num_batched_tokens` the stage's engine runs with. Ray Data LLM
    builds its engine from `AsyncEngineArgs(...).create_engine_config()`, whose defaults differ
    from those of vLLM's `LLM` class (on CPU 128 sequences and 2048 tokens a step against 256 and
    4096), so the baseline is given these explicitly."""
    from vllm import AsyncEngineArgs

    scheduler = AsyncEngineArgs(model=model, **engine_kwargs).create_engine_config().scheduler_config
    return {"max_num_seqs": scheduler.max_num_seqs, "max_num_batched_tokens": scheduler.max_num_batched_tokens}


def _vllm_offline(model: str, engine_kwargs: dict, prompts: list[str], params: list[dict], warmup: int) -> dict:
    """vLLM's own offline path, cold: import, LLM(...) with the stage's scheduler limits, a warm-up
    LLM.generate on the first `warmup` prompts, then one timed LLM.generate over every prompt."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

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
    import ray

    from pipeline.generate import PromptStyle, engine_kwargs, expand_requests

    requests = expand_requests(items, "baseline", model, sampling, None, seed, style=PromptStyle())
    task = ray.remote(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus)(_vllm_offline)
    start = time.perf_counter()
    with PeakRSS() as rss:
        out = ray.get(task.remote(model, engine_kwargs(engine), [r["prompt"] for r in requests],
                                  [r["sampling_params"] for r in requests], min(len(requests), engine.batch_size)))
    seconds = time.perf_counter() - start - out["warmup_s"]
    return {**out, "seconds": round(seconds, 2), "startup_s": round(seconds - out["generate_s"], 2),
            "tokens_per_s": round(out["tokens"] / seconds, 1), "memory": rss.mib()}


def run_stage(model: str, engine, items, sampling, seed: int, replicas: int, shard_items: int) -> dict:
    """The generate stage for one competitor with `replicas` engine replicas and answer shards of
    `shard_items` items (generate.shard_items: each shard is one input block), into a scratch dir.

    Returns `pipeline.shards.Tally.summary` (rows, tokens, start-up, steady state from batch
    completions) plus `engines`, the most engine replicas seen running at once (Ray Data's actor
    pool for `concurrency: n` scales from 1 to n, so fewer than asked may run), `memory`
    (`PeakRSS.mib`) and `driver_growth_mib`: the driver's peak RSS
    after a quarter of the answers were in less its peak before, over the last three quarters of
    the rows (a driver that kept rows would grow by their size; a streaming one stays flat)."""
    from pipeline.generate import Competitor, PromptStyle
    from pipeline.shards import generate_sharded

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
