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


def run_cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run the real `lossaverse` command line in a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*LOSSAVERSE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


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


# The multi-node cluster: a head (1 CPU, where drivers run) and three worker nodes of 2 CPUs, each
# with a custom resource of its name; node_b and node_d can hold the large competitor's engine
# (`gen_large`), node_c the small one's (`gen_small`). One per test session, for both tiers.
MULTINODE_NODES = {"node_b": {"gen_large": 1}, "node_c": {"gen_small": 1}, "node_d": {"gen_large": 1}}


@pytest.fixture(scope="session")
def multinode():
    """A real multi-raylet Ray cluster on this machine (tests/multinode.py), killed by pid at the end."""
    from tests.multinode import MultiNode

    cluster = MultiNode(head_cpus=1)
    try:
        for name, resources in MULTINODE_NODES.items():
            cluster.add(name, num_cpus=2, resources=resources)
        yield cluster
    finally:
        left = cluster.shutdown()
    assert not left, f"processes of the multi-node cluster still alive after its teardown: {left}"
