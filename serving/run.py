"""`lossaverse serve`: start the model app (and the marker) on Ray Serve and keep them up until
Ctrl-C or SIGTERM, then shut Serve and an embedded Ray down.

Two Serve applications share one HTTP proxy: `lossaverse` (the OpenAI-compatible model API, route
`/`, so `/v1/...`) and `marker` (route `/mark`). A RayService runs the same two through
`serving.model:build_app` and `serving.marker:build_app`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

from serving.model import ServeError, ServePlan, model_app, plan_from_config, plan_from_model_dir

MODEL_APP, MARKER_APP = "lossaverse", "marker"


def plan_for(target: Path, base: str | None, overrides: list[str]) -> ServePlan:
    """A run config (YAML file) or a model directory (with config.json) -> what to serve."""
    from cluster.config import load_config

    target = Path(target)
    if target.is_dir():
        if not (target / "config.json").is_file():
            raise ServeError(f"{target} is a directory without config.json: give a model directory (Hugging Face format) or a run config")
        return plan_from_model_dir(target, base, overrides)
    if base is not None:
        raise ServeError("--base goes with a MODEL_DIR; with a config, set serve.base_model_id to serve the config's target beside the trained one")
    return plan_from_config(load_config(target, overrides))


def start(plan: ServePlan) -> list[str]:
    """Deploy the apps on the connected Ray (waits until their replicas are up); return the URLs."""
    from ray import serve

    from serving.marker import marker_app

    s = plan.serve
    serve.start(http_options={"host": s.host, "port": s.port})
    apps = [serve.RunTarget(model_app(plan), name=MODEL_APP, route_prefix="/")]
    if s.marker:
        marker = marker_app(s.max_body_bytes, s.max_mark_answers, s.ingress_num_cpus, api_key_env=s.api_key_env)
        apps.append(serve.RunTarget(marker, name=MARKER_APP, route_prefix="/mark"))
    try:
        serve.run_many(apps)  # deployed side by side; returns once every app is RUNNING
    except RuntimeError as exc:  # a deployment that failed to start: Serve says which and why
        raise ServeError(f"the serving app did not start: {exc}") from None
    base = f"http://{s.host}:{s.port}"
    lines = [f"OpenAI-compatible API: {base}/v1  (models: {', '.join(plan.models)})"]
    if s.marker:
        lines.append(f"marker: POST {base}/mark")
    return lines


def stop() -> None:
    from ray import serve

    from cluster.ray_env import shutdown_ray

    try:
        serve.shutdown()
    finally:
        shutdown_ray()


def _interrupt(*_):
    raise KeyboardInterrupt


def serve_until_stopped(plan: ServePlan, address: str | None, report: Callable[[str], None] = print) -> None:
    """Start Ray and the apps, report the URLs, block until SIGINT/SIGTERM, stop."""
    from cluster.ray_env import init_ray

    report(init_ray(plan.ray, address))
    # After ray.init, which installs its own SIGTERM handler: SIGTERM must end in the cleanup below.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        for line in start(plan):
            report(line)
        report("serving; Ctrl-C to stop")
        threading.Event().wait()
    except KeyboardInterrupt:
        report("stopping ...")
    finally:
        stop()
