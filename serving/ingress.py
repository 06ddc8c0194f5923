"""ray.serve.llm's OpenAI ingress with request checks in front of every route: the API key (when
`serve.api_key_env` is set), then on `/v1/completions` and `/v1/chat/completions` a capped body
read, JSON and schema validation, and caps on `max_tokens`, `n`, `best_of`, the prompts of one
request and `logprobs`, each answered with a 4xx and a message naming the field instead of
reaching an engine.

ray.serve.llm has no request-size or field limits of its own (vLLM only refuses what exceeds the
context), so this subclass is plugged in through `LLMServingArgs.ingress_cls_config`
(`lossaverse.serving.ingress:CappedIngress`), the hook ray.serve.llm offers for a custom ingress. Routes are
bound by method name, so each route the base class serves is overridden here to check the key.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray.serve.llm.ingress import OpenAiIngress
# The base class's own model-id helpers (LoRA ids are base:adapter; "--" stands for "/" in a path).
from ray.llm._internal.common.utils.lora_utils import get_base_model_id
from ray.llm._internal.serve.utils.server_utils import replace_prefix
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.requests import Request

from lossaverse.serving.http import RequestRejected, api_key_from_env, check_api_key, read_json, validate


@dataclass(frozen=True)
class Caps:
    """What one request may ask for (from `serve.*`)."""

    max_tokens: int
    max_n: int  # n and best_of: sequences per prompt
    max_prompts: int  # prompts in one list-valued `prompt`
    max_logprobs: int  # logprobs / top_logprobs / prompt_logprobs


def prompt_count(prompt) -> int:
    """Prompts in a completions `prompt`: a string or one list of token ids is one prompt; a list
    of strings or of token-id lists is one per entry."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


# Lower bounds an engine would enforce only once the request reached it.
_AT_LEAST = {"max_tokens": 1, "max_completion_tokens": 1, "n": 1, "best_of": 1, "logprobs": 0, "top_logprobs": 0,
             "prompt_logprobs": 0, "temperature": 0}


def check_fields(body) -> None:
    """400 naming the field for what would fail inside an engine or be silently ignored: a field
    the API does not know (the request models accept and drop extra fields), no `model`, an empty
    prompt, a value below its bound, a top_p outside (0, 1]."""
    extra = sorted(getattr(body, "model_extra", None) or {})
    if extra:
        raise RequestRejected(400, f"unknown field {extra[0]!r}", extra[0])
    if body.model is None:
        raise RequestRejected(400, "model: required (see GET /v1/models)", "model")
    if hasattr(body, "prompt") and (body.prompt is None or body.prompt == [] or body.prompt == [[]]):
        raise RequestRejected(400, "prompt: required and not empty", "prompt")
    for name, low in _AT_LEAST.items():
        value = getattr(body, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise RequestRejected(400, f"{name} {value} is below {low}", name)
    top_p = getattr(body, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestRejected(400, f"top_p {top_p} is outside (0, 1]", "top_p")


def check_caps(body, caps: Caps, token_fields: tuple[str, ...]):
    """Raise a 400 naming the first field above its cap; a request without a token limit gets the cap."""
    check_fields(body)
    asked = {f: getattr(body, f) for f in token_fields if getattr(body, f, None) is not None}
    for name, value in asked.items():
        if value > caps.max_tokens:
            raise RequestRejected(400, f"{name} {value} is above this server's cap of {caps.max_tokens}", name)
    for name in ("n", "best_of"):
        value = getattr(body, name, None)
        if value is not None and value > caps.max_n:
            raise RequestRejected(400, f"{name} {value} is above this server's cap of {caps.max_n}", name)
    if hasattr(body, "prompt") and prompt_count(body.prompt) > caps.max_prompts:
        raise RequestRejected(400, f"prompt holds {prompt_count(body.prompt)} prompts; this server takes at most {caps.max_prompts} per request", "prompt")
    for name in ("logprobs", "top_logprobs", "prompt_logprobs"):
        value = getattr(body, name, None)
        # Chat's `logprobs` is a bool (its count is top_logprobs); bool is an int in Python.
        if isinstance(value, int) and not isinstance(value, bool) and value > caps.max_logprobs:
            raise RequestRejected(400, f"{name} {value} is above this server's cap of {caps.max_logprobs}", name)
    if not asked:
        setattr(body, token_fields[0], caps.max_tokens)
    return body


class CappedIngress(OpenAiIngress):
    """ray.serve.llm's OpenAI ingress with the API key checked on every route and request caps in
    front of completions and chat. A request without max_tokens gets the cap, so no request can ask
    for more than the cap."""

    def __init__(self, llm_deployments, model_cards, *, max_tokens: int, max_body_bytes: int, max_n: int = 1,
                 max_prompts: int = 1, max_logprobs: int = 0, api_key_env: str | None = None, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.caps = Caps(max_tokens, max_n, max_prompts, max_logprobs)
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key_from_env(api_key_env)  # read here, in the replica: never in the app's config

    async def _checked(self, request: Request, model, fields: tuple[str, ...], call_method: str):
        try:
            check_api_key(request, self.api_key)
            body = check_caps(validate(model, await read_json(request, self.max_body_bytes)), self.caps, fields)
            self._check_model(body.model)
        except RequestRejected as rejected:
            return rejected.response()
        return await self._process_llm_request(body, call_method=call_method, raw_request=request)

    def _check_model(self, name: str | None) -> None:
        """404 in OpenAI's error shape for a model this server does not serve (the base class
        answers FastAPI's `{"detail": ...}` there). No name is the one model, where there is one."""
        served = list(self._model_cards)
        if name is None and len(served) == 1:
            return
        if name is None or get_base_model_id(name) not in served:
            raise RequestRejected(404, f"model {name!r} is not served here; this server serves {served}", "model")

    async def completions(self, request: Request):
        return await self._checked(request, CompletionRequest, ("max_tokens",), "completions")

    async def chat(self, request: Request):
        return await self._checked(request, ChatCompletionRequest, ("max_completion_tokens", "max_tokens"), "chat")

    async def models(self, request: Request):
        try:
            check_api_key(request, self.api_key)
        except RequestRejected as rejected:
            return rejected.response()
        return await super().models()

    async def model_data(self, model: str, request: Request):
        try:
            check_api_key(request, self.api_key)
            if await self.model(replace_prefix(model)) is None:
                raise RequestRejected(404, f"model {model!r} is not served here; this server serves {list(self._model_cards)}", "model")
        except RequestRejected as rejected:
            return rejected.response()
        return await super().model_data(model)

    async def _not_served(self, request: Request):
        try:
            check_api_key(request, self.api_key)
        except RequestRejected as rejected:
            return rejected.response()
        return RequestRejected(404, f"{request.url.path} is not served here: this server answers /v1/completions and /v1/chat/completions").response()

    # Routes of the base class this server does not offer (a causal LM behind the completions API):
    # answered 404 after the key check, never passed to an engine unchecked.
    async def embeddings(self, request: Request):
        return await self._not_served(request)

    async def transcriptions(self, request: Request):
        return await self._not_served(request)

    async def score(self, request: Request):
        return await self._not_served(request)

    async def tokenize(self, request: Request):
        return await self._not_served(request)

    async def detokenize(self, request: Request):
        return await self._not_served(request)
