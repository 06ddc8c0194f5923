import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOSSAVERSE = [sys.executable, "-m", "cluster.cli"]


def run_cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run the real `lossaverse` command line in a child process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([*LOSSAVERSE, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def local_ray():
    """An embedded local Ray for the integration tier, shut down at the end."""
    import ray

    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
