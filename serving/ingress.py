"""ray.serve.llm's OpenAI ingress with request checks in front of `/v1/completions` and
`/v1/chat/completions`: a capped body read, JSON and schema validation, and `max_tokens` at most the
configured cap, each answered with a 4xx and a message instead of reaching an engine.

ray.serve.llm has no request-size or max_tokens limit of its own (vLLM only refuses what exceeds
the context), so this subclass is plugged in through `LLMServingArgs.ingress_cls_config`
(`serving.ingress:CappedIngress`), the hook ray.serve.llm offers for a custom ingress.
"""

from __future__ import annotations

from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.requests import Request

from serving.http import RequestRejected, read_json, validate


class CappedIngress(OpenAiIngress):
    """ray.serve.llm's OpenAI ingress with request checks in front of completions and chat.

    A request without max_tokens gets the cap, so no request can ask for more than the cap.
    """

    def __init__(self, llm_deployments, model_cards, *, max_tokens: int, max_body_bytes: int, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self.max_tokens = max_tokens
        self.max_body_bytes = max_body_bytes

    def _capped(self, body, fields: tuple[str, ...]):
        asked = {f: getattr(body, f) for f in fields if getattr(body, f, None) is not None}
        for name, value in asked.items():
            if value > self.max_tokens:
                raise RequestRejected(400, f"{name} {value} is above this server's cap of {self.max_tokens}", name)
        if not asked:
            setattr(body, fields[0], self.max_tokens)
        return body

    async def _checked(self, request: Request, model, fields: tuple[str, ...], call_method: str):
        try:
            body = self._capped(validate(model, await read_json(request, self.max_body_bytes)), fields)
        except RequestRejected as rejected:
            return rejected.response()
        return await self._process_llm_request(body, call_method=call_method, raw_request=request)

    async def completions(self, request: Request):
        return await self._checked(request, CompletionRequest, ("max_tokens",), "completions")

    async def chat(self, request: Request):
        return await self._checked(request, ChatCompletionRequest, ("max_completion_tokens", "max_tokens"), "chat")
