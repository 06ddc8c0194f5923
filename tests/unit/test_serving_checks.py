"""The serving apps' request checks without a server: caps on n, best_of, prompts per request and
logprobs (a 400 naming the field), and the API key (401 without it)."""

import pytest
from ray.serve.llm.openai_api_models import ChatCompletionRequest, CompletionRequest
from starlette.requests import Request

from lossaverse.serving.http import RequestRejected, api_key_from_env, check_api_key, validate
from lossaverse.serving.ingress import Caps, check_caps, prompt_count

CAPS = Caps(max_tokens=32, max_n=4, max_prompts=3, max_logprobs=2)


def _completion(**fields):
    return validate(CompletionRequest, {"model": "target", "prompt": "1 + 1 =", **fields})


def _chat(**fields):
    return validate(ChatCompletionRequest, {"model": "target", "messages": [{"role": "user", "content": "hi"}], **fields})


@pytest.mark.parametrize("fields, param", [
    ({"n": 64}, "n"),
    ({"best_of": 5}, "best_of"),
    ({"prompt": ["1 + 1 ="] * 500}, "prompt"),
    ({"prompt": [[1, 2, 3]] * 4}, "prompt"),
    ({"logprobs": 20}, "logprobs"),
    ({"max_tokens": 33}, "max_tokens"),
])
def test_a_completions_field_above_its_cap_is_a_400_naming_it(fields, param):
    with pytest.raises(RequestRejected) as caught:
        check_caps(_completion(**fields), CAPS, ("max_tokens",))
    assert caught.value.status == 400 and caught.value.param == param and param in caught.value.message


@pytest.mark.parametrize("fields, param", [({"n": 5}, "n"), ({"logprobs": True, "top_logprobs": 3}, "top_logprobs")])
def test_a_chat_field_above_its_cap_is_a_400_naming_it(fields, param):
    with pytest.raises(RequestRejected) as caught:
        check_caps(_chat(**fields), CAPS, ("max_completion_tokens", "max_tokens"))
    assert caught.value.status == 400 and caught.value.param == param


@pytest.mark.parametrize("fields, param", [
    ({"zz_unknown": 1}, "zz_unknown"), ({"best_of": 2}, "best_of"), ({"model": None}, "model"), ({"prompt": []}, "prompt"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": -1}, "n"), ({"logprobs": -2}, "logprobs"), ({"logprobs": -1}, "logprobs"), ({"temperature": -0.5}, "temperature"), ({"top_p": 1.5}, "top_p"),
])
def test_what_would_fail_inside_an_engine_or_be_dropped_is_a_400_naming_the_field(fields, param):
    """`best_of` is no field of vLLM 0.32's request (it would be dropped); logprobs -1 asks for the
    whole vocabulary; vLLM's own validators raise ValueError, which is a 400 too."""
    with pytest.raises(RequestRejected) as caught:
        check_caps(_completion(**fields), CAPS, ("max_tokens",))
    assert caught.value.status == 400 and caught.value.param == param


def test_requests_within_the_caps_pass_and_get_the_token_cap():
    body = check_caps(_completion(n=4, prompt=["a", "b", "c"], logprobs=2), CAPS, ("max_tokens",))
    assert body.max_tokens <= 32  # vLLM's completions default (16) is within the cap
    assert check_caps(_chat(logprobs=True, top_logprobs=2, n=2), CAPS, ("max_completion_tokens", "max_tokens")).max_completion_tokens == 32
    assert prompt_count("x") == prompt_count([1, 2, 3]) == 1 and prompt_count(["a", "b"]) == 2


def _request(authorization: str | None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers})


def test_without_the_key_a_request_is_a_401_and_with_it_passes():
    for header in (None, "", "Bearer wrong", "Basic sekrit", "sekrit"):
        with pytest.raises(RequestRejected) as caught:
            check_api_key(_request(header), "sekrit")
        assert caught.value.status == 401
        response = caught.value.response()
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    check_api_key(_request("Bearer sekrit"), "sekrit")
    check_api_key(_request(None), None)  # no key configured: no authentication


def test_a_key_variable_that_is_not_set_fails_the_replica_at_start(monkeypatch):
    monkeypatch.delenv("LV_NO_SUCH_KEY", raising=False)
    with pytest.raises(RuntimeError, match="LV_NO_SUCH_KEY"):
        api_key_from_env("LV_NO_SUCH_KEY")
    assert api_key_from_env(None) is None
