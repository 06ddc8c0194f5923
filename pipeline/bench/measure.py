"""What every benchmark measures with: the one home of the memory sampler, the timers and the
arithmetic of repeated measurements, for `lossaverse.pipeline.bench.genbench`, `lossaverse.pipeline.bench.markbench`,
`lossaverse.training.bench` and `lossaverse.cluster.bench` (pipeline is the lowest layer, so all of them may import it).

- `PeakRSS`: peak memory of the driver, of the worker processes under it and on the GPU while a
  block runs; `peak_memory`: the largest of each of its figures over several runs.
- `Timer`: wall and CPU seconds of a block.
- `spread`: median and range of repeats; `ratio`: a / b, or None where either side is unmeasured.
- `nvml`: NVML initialised, or None on a machine without a GPU.
"""

from __future__ import annotations

import statistics
import threading
import time

import psutil

# Worker processes of Ray that run no task or actor of ours.
RAY_IDLE = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
MEMORY_KEYS = ("driver_peak_rss_mib", "workers_peak_rss_mib", "worker_max_rss_mib", "gpu_peak_mib")


def spread(values: list[float]) -> dict:
    """Median and range of repeated measurements: {"median", "min", "max", "n"}, to 2 decimals."""
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "n": len(values)}


def ratio(a: float | None, b: float | None, digits: int = 3) -> float | None:
    """a / b rounded to `digits`; None when either is None or b is 0 (nothing to compare)."""
    if a is None or not b:
        return None
    return round(a / b, digits)


class Timer:
    """Wall (`wall`, perf_counter) and CPU (`cpu`, this process's user + system) seconds of a block."""

    def __enter__(self):
        self.start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.start, time.process_time() - self._cpu


def nvml():
    """The `pynvml` module, initialised; None without the NVML library or a driver (a CPU machine)."""
    try:
        import pynvml  # deferred: optional, GPU only

        pynvml.nvmlInit()
    except Exception:  # no NVML library or no driver: no GPU
        return None
    return pynvml


def _gpu_memory_by_pid() -> dict[int, int] | None:
    """GPU memory held by each process on this machine (NVML), or None without a GPU. NVML reads
    it from outside the process, which is what is needed here: the memory is held by processes
    this code does not run (vLLM's engine core, Ray Train workers), so the allocator's own counter
    (`torch.cuda.max_memory_allocated`) is out of reach; NVML's figure also counts the CUDA
    context and the allocator's cache, i.e. what the device has to hold."""
    pynvml = nvml()
    if pynvml is None:
        return None
    used: dict[int, int] = {}
    for i in range(pynvml.nvmlDeviceGetCount()):
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i)):
            used[proc.pid] = used.get(proc.pid, 0) + (proc.usedGpuMemory or 0)
    return used


def peak_memory(measures: list[dict]) -> dict:
    """The largest of each `PeakRSS.mib` figure over several runs (None where none measured it)."""
    return {k: max((m[k] for m in measures if m.get(k) is not None), default=None) for k in MEMORY_KEYS}


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
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            return ""
        return cmd[0] if cmd else ""

    def _worker_roots(self, me) -> list:
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
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                self._sample_once(me)
            except psutil.Error:
                pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = time.perf_counter()
        self._cpu = sum(psutil.Process().cpu_times()[:2])
        self._before = {p.pid for p in self._worker_roots(psutil.Process())}
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
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
        return dict(zip(MEMORY_KEYS, (mib(self.driver), mib(self.workers), mib(self.worker_max), mib(self.gpu))))
