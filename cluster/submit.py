"""`lossaverse submit` and `lossaverse jobs`: run a command of this project on a Ray cluster through
the Ray Jobs API (`ray.job_submission.JobSubmissionClient`, the dashboard's port, 8265).

Runtime environment: image-based. The cluster runs the project's image (Dockerfile: Ray's image
plus this project installed with the versions pinned in pyproject.toml), because torch, vLLM and
DeepSpeed wheels are gigabytes and installing them per job is slow and can resolve differently.
The job uploads the current directory as its `working_dir` (without `submit.excludes`), so the
code and the config that run are the ones submitted, and runs `lossaverse COMMAND CONFIG --set ...`
there. The config is validated here first, so a typo fails before anything reaches the cluster.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import time
from pathlib import Path
from typing import Callable

from lossaverse.cluster.config import RunConfig

SUBMITTABLE = ("run", "generate", "mark", "train", "evaluate", "check")


class SubmitError(RuntimeError):
    """The cluster cannot be reached, a job does not exist, or a submission is not possible."""


def client(address: str | None):
    """A JobSubmissionClient for `address` (else RAY_API_SERVER_ADDRESS / RAY_ADDRESS)."""
    from ray.job_submission import JobSubmissionClient  # deferred: Ray loads in seconds

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: give --address http://HEAD:8265 (the Ray dashboard of the cluster)")
    if "://" not in address:
        address = f"http://{address}"
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {exc}. Is the head running and its dashboard port (8265) reachable?") from None


def entrypoint(command: str, config: Path, overrides: list[str], root: Path) -> str:
    """`lossaverse COMMAND CONFIG --set ...` with CONFIG relative to the uploaded `root`."""
    if command not in SUBMITTABLE:
        raise SubmitError(f"cannot submit {command!r}; valid: {', '.join(SUBMITTABLE)}")
    try:
        rel = Path(config).resolve().relative_to(root.resolve())
    except ValueError:
        raise SubmitError(
            f"config {config} is outside {root}, the directory the job uploads: run `lossaverse submit` from the project directory"
        ) from None
    argv = ["lossaverse", command, rel.as_posix()]
    for item in overrides:
        argv += ["--set", item]
    return shlex.join(argv)


def runtime_env(cfg: RunConfig, root: Path) -> dict:
    env = {"working_dir": str(root.resolve()), "excludes": list(cfg.submit.excludes)}
    if cfg.submit.env_vars:
        env["env_vars"] = dict(cfg.submit.env_vars)
    return env


def submit(job_client, cfg: RunConfig, command: str, config: Path, overrides: list[str], root: Path) -> str:
    """Submit; return the job id (`lossaverse-<name>-<time>-<random>`)."""
    job_id = f"lossaverse-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    try:
        return job_client.submit_job(
            entrypoint=entrypoint(command, config, overrides, root),
            submission_id=job_id,
            runtime_env=runtime_env(cfg, root),
            metadata={"lossaverse_config": Path(config).name, "lossaverse_command": command, "run": cfg.name},
            entrypoint_num_cpus=cfg.submit.entrypoint_num_cpus,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(f"submission failed: {exc}") from None


def _call(what: str, job_id: str, fn):
    try:
        return fn()
    except (ConnectionError, RuntimeError) as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise SubmitError(f"no job {job_id!r} on this cluster") from None
        raise SubmitError(f"{what} {job_id}: {text}") from None


def info(job_client, job_id: str):
    return _call("status of", job_id, lambda: job_client.get_job_info(job_id))


def logs(job_client, job_id: str) -> str:
    return _call("logs of", job_id, lambda: job_client.get_job_logs(job_id))


def stop(job_client, job_id: str) -> bool:
    """Ask the job to stop; False when it had already finished."""
    return _call("stop", job_id, lambda: job_client.stop_job(job_id))


def follow(job_client, job_id: str, write: Callable[[str], None], poll_s: float = 1.0):
    """Stream the job's logs until it ends; return its final JobDetails."""

    async def tail():
        async for chunk in job_client.tail_job_logs(job_id):
            write(chunk)

    info(job_client, job_id)  # an unknown id fails here, with a clear message
    asyncio.run(tail())
    # The log stream closes when the driver exits; the status turns terminal just after.
    while not (details := info(job_client, job_id)).status.is_terminal():
        time.sleep(poll_s)
    return details


def wait(job_client, job_id: str, timeout_s: float, poll_s: float = 0.5):
    """Poll until the job is terminal or `timeout_s` passes; return its JobDetails."""
    deadline = time.monotonic() + timeout_s
    while not (details := info(job_client, job_id)).status.is_terminal() and time.monotonic() < deadline:
        time.sleep(poll_s)
    return details
