"""The exam marker as a Ray Serve service: `POST /mark` grades a batch of answers with the same
code as the mark stage (`lossaverse.pipeline.marker.mark.mark_row`), for evaluation loops outside lossaverse.

Request: `{"answers": [{"kind", "reference", "completion", "choices"?, "finish_reason"?,
"question"?, "id"?}, ...]}`. Response: `{"verdicts": [{"id", "correct", "extracted", "reason",
"marked_by"}, ...]}`, one per answer, in order. A body that is not JSON, misses a field, names an
unknown kind, has more than 26 options (letters A-Z), holds more than `max_answers` answers or more than `max_body_bytes` bytes gets a 4xx
with a message; a replica never sees an unchecked row. With `api_key_env` (`serve.api_key_env`), a
request without `Authorization: Bearer <key>` gets 401.

`build_app(args)` is the import path for `serve run` and a RayService's serveConfigV2
(`lossaverse.serving.marker:build_app`, route_prefix `/mark`).
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve

from lossaverse.pipeline.data.kinds import kind_of
from lossaverse.pipeline.data.prompts import LETTERS
from lossaverse.pipeline.marker.mark import mark_row
from lossaverse.serving.http import RequestRejected, api_key_from_env, check_api_key, read_json, validate


class Answer(BaseModel):
    """One answer to grade: the `answers` row contract's columns the marker reads."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    reference: str
    completion: str
    choices: list[str] | None = None  # required for kind `choice`
    finish_reason: Literal["stop", "length", "error"] | None = None  # `length`: cut by the token limit
    question: str | None = None  # lets the marker ignore numbers that only repeat the question
    id: str | None = None  # echoed back in the verdict

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        return kind_of(value).name

    @field_validator("choices")
    @classmethod
    def _at_most_26_options(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(value) > len(LETTERS):
            raise ValueError(f"{len(value)} options; the marker reads option letters A-Z, so at most {len(LETTERS)}")
        return value

    @model_validator(mode="after")
    def _choices_for_choice(self) -> "Answer":
        if self.kind == "choice" and not self.choices:
            raise ValueError("kind `choice` needs `choices` (the options, in order A, B, ...)")
        return self


class MarkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answers: list[Answer] = Field(min_length=1)


class MarkerArgs(BaseModel):
    """Arguments of `build_app` (the `args` of a serveConfigV2 application)."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_answers: int = Field(default=1000, ge=1)
    num_cpus: float = Field(default=0.25, gt=0)
    num_replicas: int = Field(default=1, ge=1)
    api_key_env: str | None = None  # requests must carry `Authorization: Bearer $<api_key_env>`


def mark_answers(answers: list[Answer]) -> list[dict]:
    """Verdicts of `answers`, in order (pure; the mark stage's per-row grading)."""
    out = []
    for a in answers:
        v = mark_row(a.completion, a.reference, a.kind, choices=a.choices, finish_reason=a.finish_reason, question=a.question)
        out.append({"id": a.id, **v._asdict()})
    return out


class _PrefixIsRoot:
    """Serve mounts this app at route_prefix `/mark`, where Starlette sees `POST /mark` as the empty
    path and answers with a redirect to `/mark/`; route it to `/` directly instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


api = FastAPI(title="lossaverse marker")
api.add_middleware(_PrefixIsRoot)


@serve.deployment(name="Marker")
@serve.ingress(api)
class Marker:
    def __init__(self, max_body_bytes: int, max_answers: int, api_key_env: str | None = None):
        self.max_body_bytes = max_body_bytes
        self.max_answers = max_answers
        self.api_key = api_key_from_env(api_key_env)  # read in the replica: never in the app's config

    @api.post("/")
    async def mark(self, request: Request):
        try:
            check_api_key(request, self.api_key)
            batch = validate(MarkRequest, await read_json(request, self.max_body_bytes))
            if len(batch.answers) > self.max_answers:
                raise RequestRejected(413, f"{len(batch.answers)} answers in one request; this server takes at most {self.max_answers}", "answers")
        except RequestRejected as rejected:
            return rejected.response()
        # Off the event loop: math answers can take math-verify a while.
        return {"verdicts": await asyncio.to_thread(mark_answers, batch.answers)}


def marker_app(max_body_bytes: int, max_answers: int, num_cpus: float, num_replicas: int = 1, api_key_env: str | None = None):
    options = {"num_replicas": num_replicas, "ray_actor_options": {"num_cpus": num_cpus}}
    return Marker.options(**options).bind(max_body_bytes=max_body_bytes, max_answers=max_answers, api_key_env=api_key_env)


def build_app(args: dict):
    """serveConfigV2 / `serve run` entry point: `lossaverse.serving.marker:build_app`."""
    a = MarkerArgs.model_validate(args or {})
    return marker_app(a.max_body_bytes, a.max_answers, a.num_cpus, a.num_replicas, a.api_key_env)
