"""`lossaverse serve` and the RayService entry point: a run config (or a model directory) -> the
checked `lossaverse.serving.model.ServePlan`, then Ray, the Serve apps, and their shutdown.

Here, not in serving/, because a run config is composed in this layer: serving/ knows only the
settings it serves with (`serve`, the engine, `ray`). A RayService runs the model app through
`lossaverse.cluster.serve:build_app` (args: `config` and `set`, or `model_dir`) and the marker through
`lossaverse.serving.marker:build_app`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lossaverse.cluster.config import RunConfig, load_config
from lossaverse.cluster.ray_env import init_ray, shutdown_ray
from lossaverse.pipeline.config import errors_in
from lossaverse.serving.model import ServeError, ServePlan, model_app, plan_from_model_dir, plan_from_run
from lossaverse.serving.run import start, stop


def plan_from_config(cfg: RunConfig) -> ServePlan:
    """Serve `<run_dir>/model`, and with `serve.base_model_id` the untrained target beside it."""
    return plan_from_run(cfg.serve, cfg.run_dir / "model", cfg.target, cfg.engine_for(cfg.target), cfg.ray)


def plan_for(target: Path, base: str | None, overrides: list[str]) -> ServePlan:
    """A run config (YAML file) or a model directory (with config.json) -> what to serve."""
    target = Path(target)
    if target.is_dir():
        if not (target / "config.json").is_file():
            raise ServeError(f"{target} is a directory without config.json: give a model directory (Hugging Face format) or a run config")
        return plan_from_model_dir(target, base, overrides)
    if base is not None:
        raise ServeError("--base goes with a MODEL_DIR; with a config, set serve.base_model_id to serve the config's target beside the trained one")
    return plan_from_config(load_config(target, overrides))


class ModelAppArgs(BaseModel):
    """Arguments of `build_app` (the `args` of a serveConfigV2 application): a run config (with
    `set` overrides) whose `<run_dir>/model` is served, or a `model_dir` (with `set`: serve.* keys)."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = None
    set: list[str] = Field(default_factory=list)
    model_dir: str | None = None
    base_model: str | None = None  # with model_dir: served beside it for A/B

    @model_validator(mode="after")
    def _one_source(self) -> "ModelAppArgs":
        if (self.config is None) == (self.model_dir is None):
            raise ValueError("give exactly one of `config` (a run config) or `model_dir`")
        if self.config is not None and self.base_model is not None:
            raise ValueError("with `config`, A/B serves the config's target: set serve.base_model_id in `set`")
        return self


def plan_from_args(args: dict | None) -> ServePlan:
    try:
        a = ModelAppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ServeError(errors_in("lossaverse.cluster.serve:build_app args", exc)) from None
    if a.config is not None:
        return plan_from_config(load_config(a.config, a.set))
    return plan_from_model_dir(a.model_dir, a.base_model, a.set)


def build_app(args: dict):
    """serveConfigV2 / `serve run` entry point: `lossaverse.cluster.serve:build_app`."""
    return model_app(plan_from_args(args))


def _interrupt(*_):
    raise KeyboardInterrupt


def serve_until_stopped(plan: ServePlan, address: str | None, report: Callable[[str], None] = print) -> None:
    """Start Ray and the apps, report the URLs, block until SIGINT/SIGTERM, stop Serve and an
    embedded Ray."""
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
        try:
            stop()
        finally:
            shutdown_ray()
