"""`lossaverse submit` and `lossaverse jobs` against a real Ray head on 127.0.0.1 with its dashboard
(the Jobs API) on, started by the test with a short temp dir and stopped by its pid."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from lossaverse.cluster.config import ConfigError, load_config
from lossaverse.cluster.submit import SubmitError, entrypoint, runtime_env
from tests.conftest import ROOT, run_cli, stop_group

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dashboard():
    """A Ray head with the dashboard and job agent on 127.0.0.1; yields the Jobs API address."""
    port, dash, agent, client = _free_port(), _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="lv-job-", dir="/tmp")  # Unix socket paths stay short
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", "--disable-usage-stats",
         f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 120
        while True:  # the job agent answers /api/jobs/ once it is up, not just the dashboard
            try:
                if httpx.get(f"{address}/api/jobs/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if head.poll() is not None or time.time() > deadline:
                pytest.fail(f"Ray head with dashboard did not start (exit {head.poll()})")
            time.sleep(1)
        yield address
    finally:
        stop_group(head, timeout=60)  # `ray start --block` stops what it started
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_id(stdout: str) -> str:
    line = next(l for l in stdout.splitlines() if l.startswith("submitted job "))
    return line.split()[-1]


def test_submit_streams_the_logs_and_reports_success(dashboard):
    out = run_cli("submit", "configs/tiny.yaml", "--command", "check", "--address", dashboard, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    job = _job_id(out.stdout)
    assert job.startswith("lossaverse-tiny-")
    assert "ok: configs/tiny.yaml" in out.stdout  # the job's own output, streamed back
    assert out.stdout.strip().splitlines()[-1] == f"job {job}: SUCCEEDED"
    status = run_cli("jobs", "status", job, "--address", dashboard)
    assert status.returncode == 0 and f"{job}: SUCCEEDED" in status.stdout
    assert "entrypoint: lossaverse check configs/tiny.yaml" in status.stdout
    logs = run_cli("jobs", "logs", job, "--address", dashboard)
    assert logs.returncode == 0 and "ok: configs/tiny.yaml" in logs.stdout


def test_a_failing_job_exits_1_with_its_status(dashboard):
    """The config is valid here but excluded from the upload, so the job fails on the cluster."""
    excludes = '[.venv, .git, runs, "**/__pycache__", configs/tiny.yaml]'
    out = run_cli("submit", "configs/tiny.yaml", "--command", "check", "--set", f"submit.excludes={excludes}",
                  "--address", dashboard, timeout=300)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert "config file not found: configs/tiny.yaml" in out.stdout
    assert f"job {_job_id(out.stdout)}: FAILED" in out.stdout


def test_no_wait_returns_at_once_and_stop_stops_the_job(dashboard, tmp_path):
    start = time.monotonic()
    out = run_cli("submit", "configs/tiny.yaml", "--no-wait", "--set", f"output_dir={tmp_path}", "--address", dashboard)
    assert out.returncode == 0, out.stderr[-2000:]
    job = _job_id(out.stdout)
    stop = run_cli("jobs", "stop", job, "--address", dashboard, timeout=120)
    assert stop.returncode == 0 and stop.stdout.strip().endswith(f"job {job}: STOPPED"), stop.stdout + stop.stderr
    assert time.monotonic() - start < 120
    again = run_cli("jobs", "stop", job, "--address", dashboard)
    assert again.returncode == 0 and "had already ended: STOPPED" in again.stdout


def test_unknown_job_and_unreachable_cluster_are_one_line_errors(dashboard):
    out = run_cli("jobs", "status", "no-such-job", "--address", dashboard)
    assert out.returncode == 2 and "no job 'no-such-job'" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    closed = f"http://127.0.0.1:{_free_port()}"
    out = run_cli("submit", "configs/tiny.yaml", "--command", "check", "--address", closed)
    assert out.returncode == 2 and "cannot reach the Ray Jobs API" in out.stderr, out.stderr


def test_a_bad_config_is_refused_before_anything_is_submitted(dashboard):
    before = httpx.get(f"{dashboard}/api/jobs/", timeout=10).json()
    out = run_cli("submit", "configs/tiny.yaml", "--set", "train.beta=-1", "--address", dashboard)
    assert out.returncode == 2 and "train.beta" in out.stderr
    assert len(httpx.get(f"{dashboard}/api/jobs/", timeout=10).json()) == len(before)


# --- the submission itself (no cluster) ----------------------------------------------------------

def test_entrypoint_is_the_command_on_the_uploaded_config_with_quoted_overrides():
    e = entrypoint("run", ROOT / "configs/tiny.yaml", ["name=my run", "generate.sampling.samples=4"], ROOT)
    assert e == "lossaverse run configs/tiny.yaml --set 'name=my run' --set generate.sampling.samples=4"
    with pytest.raises(SubmitError, match="outside"):
        entrypoint("run", Path("/etc/hosts"), [], ROOT)
    with pytest.raises(SubmitError, match="cannot submit 'serve'"):
        entrypoint("serve", ROOT / "configs/tiny.yaml", [], ROOT)


def test_runtime_env_uploads_the_project_without_the_heavy_parts():
    env = runtime_env(load_config(ROOT / "configs/tiny.yaml", ["submit.env_vars={LOG_LEVEL: debug}"]), ROOT)
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"] and env["env_vars"] == {"LOG_LEVEL": "debug"}
    with pytest.raises(ConfigError, match="look like secrets"):
        load_config(ROOT / "configs/tiny.yaml", ["submit.env_vars={HF_TOKEN: abc}"])
