"""Run configuration: one YAML file, one pydantic model per stage, composed into `RunConfig`.

Each stage's model lives with its stage (pipeline/config.py: benchmark, engine, generate, mark,
datasets, evaluate, Ray and the shared `ConfigError`, `ModelRef`; training/config.py: train;
serving/config.py: serve); the ones of the run as a whole (rounds, submit) live here. Every
model forbids unknown keys, so a typo is an error that names the field. Defaults live in the
models and nowhere else. `load_config(path, overrides)` applies `--set a.b=c` overrides before
validation, so an override is checked exactly like a value written in the file. The stage
models are re-exported: `from lossaverse.cluster.config import TrainConfig` works as before.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from lossaverse.pipeline.config import (  # noqa: F401 - re-exported: the run config's parts, importable from here
    BenchmarkConfig,
    ConfigError,
    DatasetsConfig,
    EndpointConfig,
    EngineConfig,
    EvaluateConfig,
    FewShot,
    GenerateConfig,
    JudgeConfig,
    MarkConfig,
    ModelRef,
    NodeType,
    RayConfig,
    SamplingConfig,
    Strict,
    TINY_PREFIX,
    apply_overrides,
    errors_in,
    field_errors,
)
from lossaverse.serving.config import ServeConfig  # noqa: F401 - re-exported
from lossaverse.training.config import LoraSettings, OnPolicyConfig, TrainConfig  # noqa: F401 - re-exported


class RoundsConfig(Strict):
    """Repeated play: generate, mark, train and evaluate `count` times. From round 2 on, the target
    trained in the round before replaces the `small` competitor (`replace_small`) or answers beside
    both competitors as a third player (`join`); each round answers fresh train items and trains
    the target afresh from its base on the datasets of every round so far (rows tagged by round)."""

    count: int = Field(default=1, ge=1)
    policy: Literal["replace_small", "join"] = "replace_small"
    # Stop after a round whose trained target is not better than the round before's (the 95% CI of
    # the paired difference on the eval items includes zero or lies below it).
    stop_when_no_gain: bool = False


_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)


class SubmitConfig(Strict):
    """`lossaverse submit`: the Ray Jobs runtime environment. The cluster's image (Dockerfile)
    carries the pinned dependencies; the job uploads the current directory (this project) as its
    working_dir, so the code and configs that run are the ones submitted."""

    excludes: list[str] = Field(
        default_factory=lambda: [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache"]
    )
    env_vars: dict[str, str] = Field(default_factory=dict)  # plain settings; secrets come from the cluster
    entrypoint_num_cpus: float = Field(default=0, ge=0)  # CPUs reserved for the job's driver process

    @field_validator("env_vars")
    @classmethod
    def _no_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        leaked = sorted(k for k in value if _SECRET_NAME.search(k))
        if leaked:
            raise ValueError(
                f"{leaked} look like secrets; a job's env_vars are stored in the clear by the Jobs API: "
                "give them to the cluster's pods as Kubernetes secrets instead"
            )
        return value


class RunConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*$")
    seed: int = 0
    output_dir: str = "runs"
    ray: RayConfig = RayConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    competitors: dict[Literal["large", "small"], ModelRef]
    target: ModelRef
    generate: GenerateConfig = GenerateConfig()
    mark: MarkConfig = MarkConfig()
    datasets: DatasetsConfig = DatasetsConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    rounds: RoundsConfig = RoundsConfig()
    # The round this config describes: set by the rounds loop (lossaverse.cluster.rounds.execute_rounds).
    round: int = Field(default=1, ge=1)
    serve: ServeConfig = ServeConfig()
    submit: SubmitConfig = SubmitConfig()

    @field_validator("rounds", mode="before")
    @classmethod
    def _rounds_count(cls, value: Any) -> Any:
        return {"count": value} if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("competitors")
    @classmethod
    def _both_competitors(cls, value: dict) -> dict:
        missing = {"large", "small"} - set(value)
        if missing:
            raise ValueError(f"competitors needs both `large` and `small`; missing {sorted(missing)}")
        return value

    @model_validator(mode="after")
    def _competitor_engines(self) -> "RunConfig":
        for name, ref in self.competitors.items():
            try:
                self.engine_for(ref)
            except ValidationError as exc:
                raise ValueError(f"competitors.{name}.engine.{field_errors(exc)[0]}") from None
        return self

    def style_for(self, ref: ModelRef | None = None) -> dict:
        """`ref`'s prompt style: its own `prompt_template`, `system_prompt` and `few_shot`, each
        falling back to `generate`'s (`generate`'s alone without `ref`); as keyword arguments of
        lossaverse.pipeline.generation.generate.PromptStyle."""
        g = self.generate

        def own(field: str, default):
            value = getattr(ref, field) if ref is not None else None
            return value if value is not None else default

        return {
            "template": own("prompt_template", g.prompt_template),
            "system_prompt": own("system_prompt", g.system_prompt),
            "few_shot": tuple((s.question, s.answer) for s in own("few_shot", g.few_shot)),
        }

    def engine_for(self, ref: ModelRef) -> EngineConfig:
        """`generate.engine` with the model's own engine settings on top."""
        if not ref.engine:
            return self.generate.engine
        return EngineConfig.model_validate({**self.generate.engine.model_dump(), **ref.engine})

    @model_validator(mode="after")
    def _round_in_range(self) -> "RunConfig":
        if self.round > self.rounds.count:
            raise ValueError(f"round {self.round} is past rounds.count {self.rounds.count}")
        if self.evaluate.split == "validation" and self.benchmark.n_validation == 0:
            raise ValueError("evaluate.split: validation needs validation items: set benchmark.n_validation")
        return self

    @property
    def top_dir(self) -> Path:
        """The run's directory (round 1's outputs, the rounds summary, the report)."""
        return Path(self.output_dir).expanduser() / self.name

    def round_dir(self, k: int) -> Path:
        """Round k's outputs: round 1 at the top of the run directory, round k >= 2 under rounds/k/."""
        return self.top_dir if k == 1 else self.top_dir / "rounds" / str(k)

    def at_round(self, k: int) -> "RunConfig":
        return self.model_copy(update={"round": k})

    @property
    def run_dir(self) -> Path:
        """This round's directory (the top of the run directory for round 1)."""
        return self.round_dir(self.round)


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError naming the file and field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config error in {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config error in {path}: the top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(errors_in(f"config error in {path}", exc)) from None
