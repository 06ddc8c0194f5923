"""`lossaverse serve`: the real command (Ray Serve, ray.serve.llm with vLLM CPU engines) on 127.0.0.1
with an API key, called with the `openai` client and httpx; bad requests get a 4xx with a message and
the server keeps answering, also under a bounded load and a fuzz of malformed requests. Also the
checks that refuse a serve before anything starts.

The server is the default job's: `lossaverse serve configs/local.yaml` with `serve.base_model_id`
serves the run's trained model (`<run_dir>/model`, stood in for by tiny:small, linked into a fresh run
directory, so no training runs) and, beside it as `base`, the config's target, the packaged reference
`smollm2:135m-instruct` (its converted directory, with its chat template). Token counts prove what
reached the engine: a chat request's prompt is the tokenizer's chat-template rendering, a completions
prompt is tokenized as given.
"""

import concurrent.futures
import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from lossaverse.cluster.config import ConfigError
from lossaverse.cluster.serve import build_app, plan_for, plan_from_args
from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.marker.mark import mark_row
from lossaverse.pipeline.models.tinymodels import resolve_model
from lossaverse.serving.model import ServeError, _checked, llm_config, plan_from_model_dir
from tests.conftest import LOSSAVERSE, ROOT, cli_env, run_cli, stop_group

pytestmark = pytest.mark.integration

CPU_ENGINE = ["serve.engine.kv_cache_gib=0.25", "serve.engine.max_model_len=128", "serve.engine.enforce_eager=true"]
CAP, BODY, MAX_ANSWERS = 32, 4096, 5
MAX_N, MAX_PROMPTS, MAX_LOGPROBS = 2, 3, 1
KEY_ENV, KEY = "LV_TEST_SERVE_KEY", "serve-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
REF = "smollm2:135m-instruct"  # configs/local.yaml's target: served as `base`
MESSAGES = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
RAW_PROMPT = "Question: What is 2 + 3?\nAnswer:"


def _post(url, headers=None, **kwargs):
    return httpx.post(url, headers={**AUTH, **(headers or {})}, **kwargs)


def _get(url, headers=None, **kwargs):
    return httpx.get(url, headers={**AUTH, **(headers or {})}, **kwargs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int) -> list[str]:
    return [render(p, template_for("numeric")) for p in synthetic.problems("eval", n, seed=3)]


def _ready(base: str, log: Path) -> bool:
    """The command says `serving` once Serve reports every app RUNNING (engines loaded)."""
    if "serving; Ctrl-C to stop" not in log.read_text():
        return False
    models = _get(f"{base}/v1/models", timeout=10).json()
    return {m["id"] for m in models.get("data", [])} == {"target", "base"}


def _run_dir_with_model(out: Path, model_dir: str) -> Path:
    """A run directory of configs/local.yaml under `out` whose trained model is `model_dir`."""
    (out / "local").mkdir(parents=True)
    (out / "local" / "model").symlink_to(model_dir, target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    return resolve_model(REF)  # fetched from its wheel and converted on first use, then cached


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    """`lossaverse serve configs/local.yaml` (trained model: tiny:small; base: SmolLM2) in its own
    process group, stopped by pid."""
    out = _run_dir_with_model(tmp_path_factory.mktemp("runs"), resolve_model("tiny:small"))
    port = _free_port()
    log = out / "serve.log"
    sets = [*CPU_ENGINE, f"output_dir={out}", "serve.base_model_id=base", f"serve.port={port}", f"serve.max_tokens={CAP}",
            f"serve.max_body_bytes={BODY}", f"serve.max_mark_answers={MAX_ANSWERS}", f"serve.max_n={MAX_N}",
            f"serve.max_prompts={MAX_PROMPTS}", f"serve.max_logprobs={MAX_LOGPROBS}", f"serve.api_key_env={KEY_ENV}"]
    argv = [*LOSSAVERSE, "serve", str(ROOT / "configs" / "local.yaml")]
    for s in sets:
        argv += ["--set", s]
    began = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=cli_env(**{KEY_ENV: KEY}), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600  # two engines start; minutes on a loaded 2-core machine
        while not _ready(base, log):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"serve did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(2)
        print(f"\nserve configs/local.yaml up in {time.perf_counter() - began:.0f}s")
        yield base, proc, log
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _message(response: httpx.Response) -> str:
    """The error message, in OpenAI's shape (every 4xx, the unknown model's 404 too)."""
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == response.status_code, body
    return body["error"]["message"]


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_lists_the_trained_and_the_base_model(server):
    assert sorted(m.id for m in _client(server[0]).models.list().data) == ["base", "target"]


def test_ab_completions_come_from_two_different_models(server):
    client = _client(server[0])
    texts = {}
    for model in ("target", "base"):
        for i, prompt in enumerate(_prompts(3)):
            r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
            assert r.model == model and r.usage.completion_tokens <= 12 and r.choices[0].text
            texts[model, i] = r.choices[0].text
    # Greedy decoding: the same prompt gives the same text from the same weights.
    again = client.completions.create(model="target", prompt=_prompts(1)[0], max_tokens=12, temperature=0)
    assert again.choices[0].text == texts["target", 0]
    assert any(texts["target", i] != texts["base", i] for i in range(3)), "A/B served one model twice"


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list (transformers 4) or a BatchEncoding (5)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_packaged_target_is_served_beside_the_trained_model(tmp_path, smollm2_dir):
    out = _run_dir_with_model(tmp_path, smollm2_dir)
    plan = plan_for(ROOT / "configs" / "local.yaml", None, [f"output_dir={out}", "serve.base_model_id=base"])
    assert list(plan.models) == ["target", "base"]
    assert {Path(src).resolve() for src in plan.models.values()} == {Path(smollm2_dir).resolve()}
    assert plan.engine.num_gpus == 0 and plan.max_tokens < plan.engine.max_model_len
    # No kv_cache_gib in the config: the CPU engine's cache is sized from the model.
    assert llm_config("target", plan.models["target"], plan.engine, plan.serve).engine_kwargs["kv_cache_memory_bytes"] > 0


def test_chat_completions_apply_the_packaged_models_chat_template(server, tokenizer):
    expected = _ids(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    raw = len(tokenizer(MESSAGES[0]["content"], add_special_tokens=False)["input_ids"])
    assert len(expected) > raw + 10  # the template's system turn and role markers are tokens too
    r = _client(server[0]).chat.completions.create(model="base", messages=MESSAGES, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert r.model == "base" and choice.message.role == "assistant" and choice.message.content.strip(), r
    assert choice.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens == len(expected), f"the engine saw {r.usage.prompt_tokens} prompt tokens, the template renders {len(expected)}"
    # The answer ends at the template's end-of-turn token, which is not part of the text.
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content


def test_completions_take_the_prompt_as_given(server, tokenizer):
    expected = len(tokenizer(RAW_PROMPT)["input_ids"])
    r = _client(server[0]).completions.create(model="base", prompt=RAW_PROMPT, max_tokens=16, temperature=0)
    assert r.usage.prompt_tokens == expected and r.choices[0].text.strip(), r
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 16


def test_max_tokens_above_the_cap_is_a_400(server):
    client = _client(server[0])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens {CAP + 1} is above this server's cap of {CAP}") as caught:
        client.completions.create(model="target", prompt="1 + 1 =", max_tokens=CAP + 1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match=f"max_tokens {CAP + 1} is above this server's cap of {CAP}") as caught:
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=CAP + 1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match=f"cap of {CAP}"):
        client.chat.completions.create(model="target", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="unknown field 'frobnicate'") as caught:
        client.completions.create(model="base", prompt=RAW_PROMPT, max_tokens=4, extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"
    assert server[1].poll() is None


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_answering(server):
    base = server[0]
    url = f"{base}/v1/completions"
    cases = {
        "not json": (_post(url, content=b'{"model": "target", "prompt": ', headers={"content-type": "application/json"}), 400, "not valid JSON"),
        "empty": (_post(url, content=b""), 400, "empty"),
        "a list": (_post(url, json=["target"]), 400, "must be a JSON object"),
        "wrong type": (_post(url, json={"model": "target", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
        "no prompt": (_post(url, json={"model": "target", "max_tokens": 4}, timeout=60), 400, "prompt"),
        "unknown model": (_post(url, json={"model": "nope", "prompt": "x", "max_tokens": 4}, timeout=60), 404,
                          "model 'nope' is not served here; this server serves ['target', 'base']"),
        "unknown model card": (_get(f"{base}/v1/models/nope", timeout=60), 404, "model 'nope' is not served here"),
        "too large": (_post(url, json={"model": "target", "prompt": "x" * (BODY + 1)}), 413, f"limit of {BODY} bytes"),
        "prompt past the context": (_post(url, json={"model": "target", "prompt": "1 + " * 200, "max_tokens": 4}, timeout=60), 400, ""),
    }
    for name, (response, status, words) in cases.items():
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        assert words in _message(response), f"{name}: {response.text[:300]}"
    r = _client(base).completions.create(model="target", prompt=_prompts(1)[0], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert server[1].poll() is None


ANSWERS = [
    {"id": "n-right", "kind": "numeric", "reference": "42", "completion": "6 * 7 = 42. The answer is 42."},
    {"id": "n-wrong", "kind": "numeric", "reference": "42", "completion": "The answer is 41."},
    {"id": "cut", "kind": "numeric", "reference": "42", "completion": "First 6 * 7 gives 4", "finish_reason": "length"},
    {"id": "choice", "kind": "choice", "reference": "B", "completion": "The answer is (B).", "choices": ["red", "blue", "green"]},
    {"id": "exact", "kind": "exact", "reference": "Paris", "completion": "The answer is Paris."},
]


def test_mark_returns_the_mark_stage_verdicts(server):
    r = _post(f"{server[0]}/mark", json={"answers": ANSWERS}, timeout=60)
    assert r.status_code == 200, r.text
    verdicts = r.json()["verdicts"]
    assert [v["id"] for v in verdicts] == [a["id"] for a in ANSWERS]
    for a, v in zip(ANSWERS, verdicts):
        expected = mark_row(a["completion"], a["reference"], a["kind"], choices=a.get("choices"), finish_reason=a.get("finish_reason"))
        assert (v["correct"], v["extracted"], v["reason"], v["marked_by"]) == tuple(expected), a["id"]
    assert [v["correct"] for v in verdicts] == [True, False, False, True, True]
    assert verdicts[2]["reason"] == "truncated"


def test_mark_refuses_bad_batches_with_the_field_named(server):
    url = f"{server[0]}/mark"
    one = {"kind": "numeric", "reference": "1", "completion": "1"}
    cases = [
        (_post(url, content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (_post(url, json={"answers": [{"kind": "numeric", "completion": "1"}]}), 400, "answers.0.reference: Field required"),
        (_post(url, json={"answers": [{**one, "kind": "essay"}]}), 400, "unknown benchmark kind 'essay'"),
        (_post(url, json={"answers": [{**one, "kind": "choice"}]}), 400, "needs `choices`"),
        (_post(url, json={"answers": []}), 400, "answers"),
        (_post(url, json={"answers": [one], "extra": 1}), 400, "extra"),
        (_post(url, json={"answers": [one] * (MAX_ANSWERS + 1)}), 413, f"at most {MAX_ANSWERS}"),
        (_post(url, json={"answers": [{**one, "completion": "x" * BODY}]}), 413, "limit"),
    ]
    for response, status, words in cases:
        assert response.status_code == status and words in _message(response), response.text[:300]
    assert _post(url, json={"answers": [one]}).json()["verdicts"][0]["correct"] is True


def test_without_the_key_both_apps_answer_401(server):
    base = server[0]
    one = {"answers": [{"kind": "numeric", "reference": "1", "completion": "1"}]}
    calls = {
        "completions": lambda h: httpx.post(f"{base}/v1/completions", json={"model": "target", "prompt": "1 + 1 =", "max_tokens": 2}, headers=h),
        "chat": lambda h: httpx.post(f"{base}/v1/chat/completions", json={"model": "target", "messages": [{"role": "user", "content": "hi"}]}, headers=h),
        "models": lambda h: httpx.get(f"{base}/v1/models", headers=h),
        "a model": lambda h: httpx.get(f"{base}/v1/models/target", headers=h),
        "tokenize": lambda h: httpx.post(f"{base}/tokenize", json={"model": "target", "prompt": "x"}, headers=h),
        "mark": lambda h: httpx.post(f"{base}/mark", json=one, headers=h),
    }
    for name, call in calls.items():
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = call(headers)
            assert r.status_code == 401 and "API key" in _message(r), f"{name} {headers}: {r.status_code} {r.text[:200]}"
    assert _get(f"{base}/v1/models/target").status_code == 200
    assert _post(f"{base}/mark", json=one).json()["verdicts"][0]["correct"] is True
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()


def test_fields_that_multiply_the_work_are_capped_with_the_field_named(server):
    url = f"{server[0]}/v1/completions"
    base = {"model": "target", "prompt": "1 + 1 =", "max_tokens": 2}
    cases = [({"n": MAX_N + 1}, "n"), ({"best_of": MAX_N + 1}, "best_of"), ({"prompt": ["x"] * 200}, "prompt"),
             ({"logprobs": MAX_LOGPROBS + 1}, "logprobs")]
    for fields, param in cases:
        r = _post(url, json={**base, **fields}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param and param in _message(r), r.text[:300]
    chat = {"model": "target", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = _post(f"{server[0]}/v1/chat/completions", json={**chat, "n": 64}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    ok = _post(url, json={**base, "n": MAX_N, "prompt": ["1 + 1 ="] * MAX_PROMPTS, "temperature": 0.5}, timeout=120)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_N * MAX_PROMPTS


LOAD_S, LOAD_CLIENTS = 10.0, 6  # 4 on completions, 2 on /mark


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def test_a_bounded_load_is_served_without_errors_and_the_replicas_stay_up(server, tmp_path):
    """LOAD_CLIENTS clients send requests back to back for LOAD_S seconds: 4 completions clients
    (16 tokens, sampled) and 2 /mark clients (a batch of 5 answers). Every request must succeed;
    p50/p99 latency and throughput go to the test output and load.json."""
    base, proc, _ = server
    prompts = _prompts(8)
    stop_at = time.perf_counter() + LOAD_S

    def client(i: int, kind: str) -> dict:
        out = {"kind": kind, "latencies": [], "errors": [], "tokens": 0}
        with httpx.Client(headers=AUTH, timeout=60) as http:
            n = 0
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    if kind == "completions":
                        r = http.post(f"{base}/v1/completions", json={"model": "target" if i % 2 else "base", "prompt": prompts[n % 8],
                                                                      "max_tokens": 16, "temperature": 0.7, "seed": n})
                    else:
                        r = http.post(f"{base}/mark", json={"answers": ANSWERS})
                    if r.status_code != 200:
                        out["errors"].append(f"{r.status_code} {r.text[:200]}")
                    elif kind == "completions":
                        out["tokens"] += r.json()["usage"]["completion_tokens"]
                except httpx.HTTPError as exc:
                    out["errors"].append(repr(exc))
                out["latencies"].append(time.perf_counter() - start)
                n += 1
        return out

    kinds = ["completions"] * 4 + ["mark"] * (LOAD_CLIENTS - 4)
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(LOAD_CLIENTS) as pool:
        results = list(pool.map(client, range(LOAD_CLIENTS), kinds))
    wall = time.perf_counter() - began
    report = {"seconds": round(wall, 1), "clients": LOAD_CLIENTS}
    for kind in ("completions", "mark"):
        lat = [x for r in results if r["kind"] == kind for x in r["latencies"]]
        report[kind] = {"requests": len(lat), "errors": sum(len(r["errors"]) for r in results if r["kind"] == kind),
                        "p50_ms": round(1000 * _percentile(lat, 0.5)), "p99_ms": round(1000 * _percentile(lat, 0.99)),
                        "requests_per_s": round(len(lat) / wall, 2)}
    report["completions"]["tokens_per_s"] = round(sum(r["tokens"] for r in results) / wall, 1)
    (tmp_path / "load.json").write_text(json.dumps(report, indent=2))
    print("\nload test:", json.dumps(report))
    errors = [e for r in results for e in r["errors"]]
    assert not errors, errors[:5]
    assert report["completions"]["requests"] >= 4 and report["mark"]["requests"] >= 2
    # Still up and answering after the load.
    assert proc.poll() is None
    assert sorted(m.id for m in _client(base).models.list().data) == ["base", "target"]
    r = _client(base).completions.create(model="target", prompt=prompts[0], max_tokens=4, temperature=0)
    assert r.usage.completion_tokens >= 1


# --- fuzz: malformed requests get a 4xx, never a 5xx, never a hang ------------------------------

def _fuzz_strategies():
    from hypothesis import strategies as st

    json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=20))
    json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
    word = st.text(alphabet="abcxyz", min_size=1, max_size=8)  # never parses as a number
    wrong_number = st.one_of(word, st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(word, st.integers(), min_size=1, max_size=2),
                             st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: x != int(x)))
    bad_fields = st.one_of(
        st.tuples(st.sampled_from(["max_tokens", "n", "best_of", "logprobs", "seed"]), wrong_number),
        st.tuples(st.sampled_from(["max_tokens", "n", "best_of", "logprobs"]), st.integers(-2**40, 0).map(lambda v: v - 1)),
        st.tuples(st.sampled_from(["max_tokens", "n", "best_of", "logprobs"]), st.integers(10_000, 2**62)),
        st.tuples(st.sampled_from(["temperature", "top_p", "presence_penalty"]), word),
        st.tuples(st.just("top_p"), st.floats(1.5, 1e6)),
        st.tuples(st.just("temperature"), st.floats(-1e6, -0.01)),
        st.tuples(st.just("prompt"), st.one_of(st.none(), st.integers(), st.dictionaries(word, word, min_size=1, max_size=2), st.just([]))),
        st.tuples(st.just("model"), st.one_of(st.none(), st.integers(), st.lists(word, min_size=1, max_size=2))),
        st.tuples(word.map(lambda w: "zz_" + w), json_value),  # unknown field
    )
    completions = st.one_of(
        st.binary(max_size=64).map(lambda b: ("raw", b)),
        json_value.filter(lambda v: not isinstance(v, dict)).map(lambda v: ("json", v)),
        st.dictionaries(word, json_value, max_size=4).map(lambda v: ("json", v)),
        bad_fields.map(lambda kv: ("json", {"model": "target", "prompt": "1 + 1 =", "max_tokens": 2, kv[0]: kv[1]})),
    )
    answer_field = st.sampled_from(["kind", "reference", "completion", "choices", "finish_reason", "id"])
    mark = st.one_of(
        st.binary(max_size=64).map(lambda b: ("raw", b)),
        json_value.map(lambda v: ("json", {"answers": v} if not isinstance(v, list) or not v else v)),
        st.tuples(answer_field, st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2), st.dictionaries(word, word, min_size=1, max_size=2))).map(
            lambda kv: ("json", {"answers": [{"kind": "numeric", "reference": "1", "completion": "1", kv[0]: kv[1]}]})),
        st.tuples(st.sampled_from(["essay", "", "NUMERIC"]), word).map(lambda kv: ("json", {"answers": [{"kind": kv[0], "reference": kv[1], "completion": kv[1]}]})),
    )
    return completions, mark


def test_malformed_requests_get_a_4xx_never_a_5xx_or_a_hang(server):
    from hypothesis import HealthCheck, given, settings, strategies as st

    completions, mark = _fuzz_strategies()
    base = server[0]
    seen = {}

    @settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(completions.map(lambda b: ("/v1/completions", b)), mark.map(lambda b: ("/mark", b))))
    def check(case):
        path, (kind, body) = case
        content = body if kind == "raw" else json.dumps(body).encode()
        # A hang shows up as httpx's timeout.
        r = httpx.post(f"{base}{path}", content=content, headers={**AUTH, "content-type": "application/json"}, timeout=30)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert 400 <= r.status_code < 500, f"{path} {content[:300]!r} -> {r.status_code} {r.text[:300]}"

    check()
    print("\nfuzz status codes:", seen)
    assert server[1].poll() is None
    assert _post(f"{base}/mark", json={"answers": [{"kind": "numeric", "reference": "1", "completion": "1"}]}).status_code == 200


def test_sigterm_stops_the_server_and_its_ray(server):
    base, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "stopping" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        _get(f"{base}/v1/models", timeout=5)


# --- checks before anything starts (no Ray) ------------------------------------------------------

def test_cpu_serving_sizes_the_cache_from_a_local_model_and_refuses_a_hub_id_without_a_size():
    from lossaverse.pipeline.generation.kvcache import plan_kv, read_hf_config

    model = resolve_model("tiny:small")
    plan = plan_from_model_dir(model)  # no kv_cache_gib: sized from the model's config.json
    kwargs = llm_config("target", model, plan.engine, plan.serve).engine_kwargs
    assert kwargs["kv_cache_memory_bytes"] == plan_kv(plan.engine, read_hf_config(model)).cache_bytes > 0
    with pytest.raises(ServeError, match="HuggingFaceTB/SmolLM2-135M-Instruct on CPU .*serve.engine.kv_cache_gib=0.25"):
        _checked(plan.serve, plan.engine, {"target": "HuggingFaceTB/SmolLM2-135M-Instruct"}, plan.ray)


def test_a_cap_that_fills_the_context_is_refused():
    with pytest.raises(ServeError, match=r"serve.max_tokens \(128\) must be below the engine's max_model_len \(128\)"):
        plan_from_model_dir(resolve_model("tiny:small"), overrides=[*CPU_ENGINE, "serve.max_tokens=128"])


def test_unknown_settings_are_named():
    with pytest.raises(ConfigError, match="serve.max_token"):
        plan_from_model_dir(resolve_model("tiny:small"), overrides=[*CPU_ENGINE, "serve.max_token=3"])
    with pytest.raises(ServeError, match="serve.engine: max_model_len"):
        plan_from_model_dir(resolve_model("tiny:small"), overrides=["serve.engine.max_model_len=0"])


def test_plan_and_llm_config_follow_the_serve_settings():
    plan = plan_from_model_dir(resolve_model("tiny:small"), "tiny:large",
                               [*CPU_ENGINE, "serve.min_replicas=0", "serve.max_replicas=3", "serve.engine.num_cpus=2"])
    assert list(plan.models) == ["target", "base"] and plan.max_tokens == 64  # max_model_len // 2
    cfg = llm_config("target", plan.models["target"], plan.engine, plan.serve)
    assert cfg.deployment_config["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 3, "target_ongoing_requests": 8}
    assert cfg.placement_group_config["bundle_per_worker"] == {"CPU": 2}
    assert cfg.engine_kwargs["kv_cache_memory_bytes"] == 2**28 and cfg.engine_kwargs["max_model_len"] == 128


def test_serve_config_builder_takes_a_model_dir_or_a_config(tmp_path):
    """The serveConfigV2 entry point builds an application without a running Ray."""
    from ray.serve import Application

    app = build_app({"model_dir": resolve_model("tiny:small"), "set": CPU_ENGINE})
    assert isinstance(app, Application)
    with pytest.raises(ServeError, match="exactly one of `config`"):
        plan_from_args({"config": "configs/tiny.yaml", "model_dir": "x"})
    with pytest.raises(ServeError, match="run `lossaverse train CONFIG` first"):
        plan_from_args({"config": str(ROOT / "configs/tiny.yaml"), "set": [f"output_dir={tmp_path}"]})


def test_cli_refuses_a_run_without_a_trained_model(tmp_path):
    out = run_cli("serve", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}", timeout=300)
    assert out.returncode == 2 and "run `lossaverse train CONFIG` first" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
