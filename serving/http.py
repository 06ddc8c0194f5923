"""Request checks shared by the serving apps: the API key, a capped body read, JSON parsing and
pydantic validation, each turning bad input into a 4xx with a message (OpenAI's error shape)
instead of an exception inside a replica.

The body is read in chunks and the read stops at the cap, so an oversized request costs at most
`max_bytes` of memory whatever its Content-Length says.
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from lossaverse.pipeline.config import field_errors

M = TypeVar("M", bound=BaseModel)


class RequestRejected(Exception):
    """A request the server will not run; `status` is a 4xx, `message` says what to fix."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        kind = {413: "request_too_large", 401: "authentication_error"}.get(self.status, "invalid_request_error")
        error = {"message": self.message, "type": kind, "param": self.param, "code": self.status}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(status_code=self.status, content={"error": error}, headers=headers)


def api_key_from_env(env: str | None) -> str | None:
    """The API key held by environment variable `env` (`serve.api_key_env`); None: no key asked.
    Read where requests are checked (the replica), so the key never enters an app's config."""
    if env is None:
        return None
    key = os.environ.get(env, "")
    if not key:
        raise RuntimeError(f"serve.api_key_env names {env}, which is not set (or empty) in this process: set it on every Ray node")
    return key


def check_api_key(request: Request, key: str | None) -> None:
    """401 unless the request carries `Authorization: Bearer <key>` (compared in constant time)."""
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise RequestRejected(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, at most `max_bytes`; 413 as soon as it is known to be larger."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestRejected(413, f"request body of {int(declared)} bytes is above this server's limit of {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise RequestRejected(413, f"request body is above this server's limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestRejected(400, "the client disconnected before the request body was complete") from None
    return b"".join(chunks)


async def read_json(request: Request, max_bytes: int) -> Any:
    body = await read_body(request, max_bytes)
    if not body.strip():
        raise RequestRejected(400, "the request body is empty; send a JSON object")
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise RequestRejected(400, "the request body is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise RequestRejected(400, f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def validate(model: type[M], data: Any) -> M:
    """`data` as `model`, or 400 naming every bad field (`answers.2.reference: Field required`)."""
    if not isinstance(data, dict):
        raise RequestRejected(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = ".".join(str(p) for p in exc.errors()[0]["loc"]) or None
        raise RequestRejected(400, "invalid request: " + "; ".join(field_errors(exc, "(body)")[:10]), param=first) from None
    except Exception as exc:  # a validator's own error: vLLM's request models raise VLLMValidationError
        raise RequestRejected(400, f"invalid request: {exc}"[:1000], param=getattr(exc, "parameter", None)) from None
