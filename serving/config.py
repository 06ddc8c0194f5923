"""Serving's config (`serve` in the run config)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from lossaverse.pipeline.config import Strict


class ServeConfig(Strict):
    """`lossaverse serve`: the trained target behind an OpenAI-compatible API (ray.serve.llm),
    optionally the untrained target beside it for A/B, and the marker at `POST /mark`.

    The engine is the target's (`generate.engine` with `target.engine` on top) with `engine` on top
    of that; `concurrency` and `batch_size` are Ray Data settings and do not apply to serving.
    """

    model_id: str = Field(default="target", pattern=r"^[A-Za-z0-9][\w.:-]*$")  # the `model` clients name
    base_model_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][\w.:-]*$")  # A/B: the untrained target
    host: str = "127.0.0.1"  # 0.0.0.0 to take requests from other machines
    port: int = Field(default=8000, ge=1, le=65535)
    # Serve's HTTP proxies answer a request not finished in this time with a 408 (Ray's own default
    # is no limit): a request whose replica's node dies mid-answer ends instead of hanging. End to
    # end, streamed answers included: keep it above the longest generation serve.max_tokens allows.
    # None: no limit.
    request_timeout_s: float | None = Field(default=300, gt=0)
    min_replicas: int = Field(default=1, ge=0)  # per model; 0 lets an idle model scale to zero
    max_replicas: int = Field(default=1, ge=1)
    target_ongoing_requests: int = Field(default=8, ge=1)  # autoscaling: in-flight requests per replica
    engine: dict[str, Any] = Field(default_factory=dict)  # engine settings over the target's
    # The HTTP ingress and the marker are light; a fraction of a CPU keeps them schedulable when the
    # engines hold every whole logical CPU.
    ingress_num_cpus: float = Field(default=0.25, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)  # cap on a request's max_tokens; None: max_model_len // 2
    # Caps on what one request may multiply: sequences per prompt (n, best_of), prompts in one
    # list-valued `prompt`, and log-probabilities per token; above them a 400 names the field.
    max_n: int = Field(default=4, ge=1)
    max_prompts: int = Field(default=16, ge=1)
    max_logprobs: int = Field(default=5, ge=0)
    # Name of the environment variable holding the API key; set, every request to the model API
    # and to /mark needs `Authorization: Bearer <key>` (else 401). None: no authentication.
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    max_body_bytes: int = Field(default=1_048_576, ge=1024)  # larger request bodies get 413
    marker: bool = True  # also serve POST /mark
    max_mark_answers: int = Field(default=1000, ge=1)  # answers per /mark request

    @model_validator(mode="after")
    def _replicas_ordered(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.base_model_id is not None and self.base_model_id == self.model_id:
            raise ValueError(f"base_model_id must differ from model_id ({self.model_id!r})")
        return self
