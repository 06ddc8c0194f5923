"""`--address` / RAY_ADDRESS: the job connects to a running Ray head instead of starting its own."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A real Ray head on 127.0.0.1 with 3 CPUs, stopped by its pid at the end."""
    port = _free_port()
    # A short temp dir: Ray's Unix socket paths under it must stay within 107 characters.
    temp_dir = tempfile.mkdtemp(prefix="lv-ray-", dir="/tmp")
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=3",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # A loopback-only test head: no token auth, as for the embedded Ray the driver would start.
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.5)
    else:
        head.kill()
        pytest.fail("Ray head did not start in 60 s")
    yield address
    head.terminate()  # `ray start --block` stops the processes it started
    try:
        head.wait(timeout=60)
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_connects_to_the_given_address(ray_head):
    code = (
        "import ray; from lossaverse.cluster.config import RayConfig; from lossaverse.cluster.ray_env import init_ray;"
        f"print(init_ray(RayConfig(num_cpus=1), {ray_head!r})); print(int(ray.cluster_resources()['CPU']))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == f"ray: connected to {ray_head}"
    assert lines[-1] == "3"  # the head's CPUs, not the embedded default
