"""The aligned model behind an OpenAI-compatible API: a Ray Serve app built by ray.serve.llm.

`plan_from_run` / `plan_from_model_dir` turn a run's trained target or a model directory into a
`ServePlan` (model ids -> sources, engine, limits), checked before anything starts;
`model_app(plan)` builds the application with `build_openai_app` (one `LLMConfig` per model: the
trained target, and for A/B the untrained target beside it). A run config is read one layer up:
`lossaverse.cluster.serve` (`plan_from_config`, and `build_app(args)`, the import path for `serve run` and a
RayService's serveConfigV2, `lossaverse.cluster.serve:build_app`).

The requests pass through `lossaverse.serving.ingress.CappedIngress` (API key, size, JSON, schema and caps
on max_tokens, n, best_of, prompts per request and logprobs). ray.serve.llm (and vLLM behind it) is imported only when an app is built, so a plan that
fails its checks fails in a second, before any engine code loads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from lossaverse.pipeline.config import ConfigError, EngineConfig, ModelRef, RayConfig, apply_overrides, errors_in
from lossaverse.pipeline.generation.kvcache import read_hf_config
from lossaverse.pipeline.generation.processors import engine_kwargs
from lossaverse.serving.config import ServeConfig


class ServeError(ConfigError):
    """A model that cannot be served as asked; the message says what to change (the CLI prints it
    as one line, like any config error)."""


@dataclass(frozen=True)
class ServePlan:
    """What `lossaverse serve` runs: every model id with its source, one engine setting, limits."""

    serve: ServeConfig
    engine: EngineConfig
    models: dict[str, str]  # model id -> directory or hub id, the trained target first
    max_tokens: int  # the resolved cap on a request's max_tokens
    ray: RayConfig = field(default_factory=RayConfig)


def _engine(base: dict, over: dict) -> EngineConfig:
    try:
        return EngineConfig.model_validate({**base, **over})
    except ValidationError as exc:
        raise ServeError(errors_in("serve.engine", exc)) from None


def _checked(serve: ServeConfig, engine: EngineConfig, models: dict[str, str], ray: RayConfig) -> ServePlan:
    """The checks that must pass before any replica starts."""
    for model_id, source in models.items():
        local = source.startswith(("/", ".", "~")) or Path(source).exists()  # else a hub id
        if local and not (Path(source).expanduser() / "config.json").is_file():
            what = "trained model" if model_id == serve.model_id else "model"
            raise ServeError(f"no {what} at {source} (no config.json): run `lossaverse train CONFIG` first, or give a model directory")
    unsized = [s for s in models.values() if read_hf_config(str(Path(s).expanduser())) is None]
    if engine.num_gpus == 0 and engine.kv_cache_gib is None and unsized:
        raise ServeError(
            f"serving {unsized[0]} on CPU (engine num_gpus 0) needs an explicit KV cache size: it has no local "
            "config.json to size the cache from; --set serve.engine.kv_cache_gib=0.25 (vLLM's utilization-based "
            "sizing fails on CPU)"
        )
    if serve.api_key_env and not os.environ.get(serve.api_key_env):
        raise ServeError(f"serve.api_key_env is {serve.api_key_env}, but that environment variable is not set: export it (the API key) first")
    cap = serve.max_tokens or engine.max_model_len // 2
    if cap >= engine.max_model_len:
        raise ServeError(
            f"serve.max_tokens ({cap}) must be below the engine's max_model_len ({engine.max_model_len}): "
            "the prompt and the completion share the context"
        )
    return ServePlan(serve, engine, models, cap, ray)


def plan_from_run(serve: ServeConfig, model_dir: Path, target: ModelRef, target_engine: EngineConfig,
                  ray: RayConfig) -> ServePlan:
    """Serve a run's trained target at `model_dir`, and with `serve.base_model_id` the untrained
    `target` beside it; the engine is the target's (`target_engine`) with `serve.engine` on top."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    models = {serve.model_id: str(Path(model_dir).expanduser().resolve())}
    if serve.base_model_id:
        if target.endpoint is not None:
            raise ServeError("serve.base_model_id: the target is served elsewhere (target.endpoint); A/B needs its weights here")
        models[serve.base_model_id] = resolve_model(target.path)
    engine = _engine(target_engine.model_dump(), serve.engine)
    return _checked(serve, engine, models, ray)


class _DirSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()


def plan_from_model_dir(model_dir: str | Path, base_model: str | None = None, overrides: list[str] | None = None) -> ServePlan:
    """Serve a model directory; `overrides` set `serve.*` and `ray.*` (`serve.engine.kv_cache_gib=0.25`).
    `base_model` (a directory, hub id or `tiny:<size>`) is served beside it for A/B, as
    `serve.base_model_id` (default `base`)."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    data = apply_overrides({}, overrides or [])
    try:
        settings = _DirSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(errors_in("with a MODEL_DIR, --set takes serve.* and ray.* keys", exc)) from None
    serve = settings.serve
    if base_model and not serve.base_model_id:
        serve = serve.model_copy(update={"base_model_id": "base" if serve.model_id != "base" else "base-model"})
    if serve.base_model_id and not base_model:
        raise ServeError("serve.base_model_id is set but no base model to serve: give --base MODEL")
    models = {serve.model_id: str(Path(model_dir).expanduser().resolve())}
    if serve.base_model_id:
        try:
            source = resolve_model(base_model)
        except ValueError as exc:
            raise ServeError(f"--base: {exc}") from None
        # A local directory is loaded by the replicas, whose working directory is not this one.
        models[serve.base_model_id] = str(Path(source).expanduser().resolve()) if Path(source).expanduser().exists() else source
    return _checked(serve, _engine({}, serve.engine), models, settings.ray)


def llm_config(model_id: str, source: str, engine: EngineConfig, serve: ServeConfig):
    """One served model as a ray.serve.llm LLMConfig: engine arguments, placement, autoscaling."""
    from ray.serve.llm import LLMConfig  # deferred: Ray loads in seconds


    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        # The generate stage's builder (chunked prefill off on CPU); prefix caching as vLLM decides.
        # A CPU engine without kv_cache_gib gets a cache sized from the model (pipeline/generation/kvcache.py).
        engine_kwargs=engine_kwargs(engine, prefix_caching=None, hf_config=read_hf_config(source)),
        # One bundle per tensor/pipeline-parallel worker; ray.serve.llm replicates it tp*pp times.
        placement_group_config={"bundle_per_worker": engine.bundle, "strategy": engine.placement_strategy},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": serve.min_replicas,
                "max_replicas": serve.max_replicas,
                "target_ongoing_requests": serve.target_ongoing_requests,
            }
        },
    )


def model_app(plan: ServePlan):
    """The OpenAI-compatible application for `plan` (not yet running)."""
    from ray.serve.llm import build_openai_app  # deferred: Ray loads in seconds

    return build_openai_app(
        {
            "llm_configs": [llm_config(mid, src, plan.engine, plan.serve) for mid, src in plan.models.items()],
            "ingress_cls_config": {
                "ingress_cls": "lossaverse.serving.ingress:CappedIngress",
                "ingress_extra_kwargs": {
                    "max_tokens": plan.max_tokens, "max_body_bytes": plan.serve.max_body_bytes, "max_n": plan.serve.max_n,
                    "max_prompts": plan.serve.max_prompts, "max_logprobs": plan.serve.max_logprobs,
                    "api_key_env": plan.serve.api_key_env,
                },
            },
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": plan.serve.ingress_num_cpus}},
        }
    )


def describe(plan: ServePlan) -> list[str]:
    """One line per served model, for the command line."""
    e = plan.engine
    where = f"{e.num_gpus:g} GPU" if e.num_gpus else f"{e.num_cpus:g} CPU"
    return [
        f"model {mid!r}: {src} (engine bundles {e.bundles_per_replica} x {where} per replica, "
        f"replicas {plan.serve.min_replicas}..{plan.serve.max_replicas}, max_tokens <= {plan.max_tokens})"
        for mid, src in plan.models.items()
    ]
