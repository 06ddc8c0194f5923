import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSSAVERSE = [sys.executable, "-m", "lossaverse"]

# The two tiers (README "Tests"). `make test` runs `-m "not slow"`: unit and integration, the one a
# contributor runs between edits. `make test-all` (CI) runs everything. `slow` is set here alone:
# every e2e test, and the integration test whose engine dies on every batch (restarted, then failed).
SLOW_INTEGRATION = {
    "tests/integration/test_generate_faults.py::test_an_engine_dying_on_every_batch_fails_the_job_naming_its_error",
}
# pytest-timeout's limit for a slow test, setup included (pyproject sets the fast tier's): the
# whole-loop fixtures took up to 428 s on 2 cores (the SmolLM2 loop of two rounds), so a hang fails
# in 15 minutes, with the stack.
SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath)).relative_to(ROOT).as_posix()
        if path.startswith("tests/e2e/") or f"{path}::{item.originalname}" in SLOW_INTEGRATION:
            item.add_marker(pytest.mark.slow)
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


# What the suite starts, counted from the process table: every vLLM engine runs an engine-core
# process titled `VLLM::EngineCore` (Ray Data replicas, Serve replicas and `LLM.generate` alike),
# every Ray Train run a `TrainController` actor, and every worker group its `RayTrainWorker`
# actors, started together. A daemon thread polls /proc (the processes live for seconds at least)
# and the summary at the end names the totals and every test file that started any, most first.
STARTS = {"vLLM engines": "VLLM::EngineCore", "Ray Train runs": "ray::TrainController", "Ray Train workers": "ray::RayTrainWorker"}
GROUP_GAP_TICKS = 5 * os.sysconf("SC_CLK_TCK")  # workers that start within 5 s of each other: one group


class StartCounter:
    def __init__(self):
        self.seen: dict[tuple[int, int], tuple[str, str]] = {}  # (pid, start tick) -> (kind, test file)
        self.test = "(setup)"
        self.since = 0  # boot ticks when the session started: older processes are not the suite's
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True, name="start-counter")

    def _poll(self):
        while not self.stop.wait(0.25):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        title = f.read(64).split(b"\0")[0].decode(errors="replace")
                    with open(f"/proc/{entry}/stat") as f:
                        tick = int(f.read().rpartition(")")[2].split()[19])
                except OSError:
                    continue
                kind = next((k for k, prefix in STARTS.items() if title.startswith(prefix)), None)
                if kind is not None and tick >= self.since:
                    self.seen.setdefault((int(entry), tick), (kind, self.test))

    def summary(self) -> list[str]:
        counts = {kind: 0 for kind in STARTS}
        per_file: dict[str, dict[str, int]] = {}
        for kind, test in self.seen.values():
            counts[kind] += 1
            per_file.setdefault(test, dict.fromkeys(STARTS, 0))[kind] += 1
        ticks = sorted(t for (_, t), (kind, _) in self.seen.items() if kind == "Ray Train workers")
        groups = sum(1 for i, t in enumerate(ticks) if i == 0 or t - ticks[i - 1] > GROUP_GAP_TICKS)
        lines = [", ".join(f"{n} {kind}" for kind, n in counts.items()) + f" (about {groups} worker groups)"]
        top = sorted(per_file.items(), key=lambda kv: -sum(kv[1].values()))
        lines += [f"  {test}: " + ", ".join(f"{n} {kind}" for kind, n in c.items() if n) for test, c in top]
        return lines


COUNTER = StartCounter()


def pytest_sessionstart(session):
    with open("/proc/uptime") as f:
        COUNTER.since = int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK"))
    COUNTER.thread.start()


def pytest_runtest_logstart(nodeid, location):
    COUNTER.test = nodeid.split("::")[0]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    COUNTER.stop.set()
    terminalreporter.section("starts (from the process table)")
    for line in COUNTER.summary():
        terminalreporter.write_line(line)


def cli_env(**extra: str) -> dict:
    """The environment of a `lossaverse` child process that starts its own embedded Ray."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def run_cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run the real `lossaverse` command line in a child process."""
    return subprocess.run([*LOSSAVERSE, *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def stop_group(proc: subprocess.Popen, timeout: float = 90) -> None:
    """Stop a child started with start_new_session: SIGTERM (`lossaverse serve` shuts Serve, and an
    embedded Ray, down; `ray start --block` stops what it started), a bounded wait, then SIGKILL to
    whatever of its process group is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def local_ray():
    """An embedded local Ray for the integration tier, shut down at the end."""
    import ray

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if ray.is_initialized():  # auto-started by an earlier test's Ray call (Serve's builders): not ours
        ray.shutdown()
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# Training's reference: KTO on 2 workers with DeepSpeed ZeRO-3 (parameters partitioned over the
# ranks), the reference model's log-probabilities precomputed and the class weights from the counts
# ("auto"), uninterrupted, on `make_datasets`'s table with every answer wrong (REFERENCE_DATA: 33 KTO
# rows, all undesirable; 16 steps of a global batch of 4 span more than an epoch, with checkpoints at
# steps 4, 8 and 12). The integration tier checks the run itself (tests/integration/test_train.py);
# the run that loses nodes and resumes (tests/e2e/test_train_node_loss.py) must end with its losses
# and weights. One run serves both.
REFERENCE_TRAIN = {"method": "kto", "num_workers": 2, "per_device_batch_size": 2, "max_steps": 16, "checkpoint_every": 4,
                   "learning_rate": 1e-3, "max_length": 64, "logging_steps": 1, "deepspeed": "zero3", "weights": "auto",
                   "precompute_ref_log_probs": True}
REFERENCE_DATA = {"large_right": False}  # make_datasets: negatives only


def train_tiny(train, tmp: Path, datasets: Path, **kw) -> dict:
    """Train tiny:small with `train` (a TrainConfig) on `datasets`, seed 0: the model to tmp/model,
    Ray Train's storage in tmp/checkpoints. `train_model`'s result."""
    from lossaverse.pipeline.models.tinymodels import resolve_model
    from lossaverse.training.train import train_model
    from lossaverse.training.validate import target_parameters

    model = resolve_model("tiny:small")
    return train_model(train, model, datasets, tmp / "model", tmp / "checkpoints", seed=0,
                       params=target_parameters(model, train), **kw)


@pytest.fixture(scope="session")
def kto_reference(local_ray, tmp_path_factory):
    """The reference run, with TensorBoard: {tmp (its model/ and checkpoints/), result, logged (the
    entries streamed live to the driver)}."""
    from lossaverse.cluster.config import TrainConfig
    from tests.unit.test_train import make_datasets

    tmp, logged = tmp_path_factory.mktemp("kto-reference"), []
    result = train_tiny(TrainConfig(**REFERENCE_TRAIN, report_to=["tensorboard"]), tmp, make_datasets(tmp, **REFERENCE_DATA),
                        on_log=logged.append)
    return {"tmp": tmp, "result": result, "logged": logged}


class JSONHandler(BaseHTTPRequestHandler):
    """Base for the small real HTTP servers tests start on 127.0.0.1: JSON replies, no request log."""

    def send_json(self, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(handler):
    """Serve `handler` on a free port of 127.0.0.1 in a thread; yield the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
