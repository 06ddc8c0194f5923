"""`lossaverse serve`: the real command (Ray Serve, ray.serve.llm with vLLM CPU engines, tiny models)
on 127.0.0.1, called with the `openai` client and httpx; bad requests get a 4xx with a message and
the server keeps answering. Also the checks that refuse a serve before anything starts."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from cluster.config import ConfigError
from pipeline import synthetic
from pipeline.mark import mark_row
from pipeline.prompts import TEMPLATES, render
from pipeline.tinymodels import resolve_model
from serving.model import ServeError, build_app, llm_config, plan_from_args, plan_from_model_dir
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration

CPU_ENGINE = ["serve.engine.kv_cache_gib=0.25", "serve.engine.max_model_len=128", "serve.engine.enforce_eager=true"]
CAP, BODY, MAX_ANSWERS = 32, 4096, 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prompts(n: int) -> list[str]:
    return [render(p, TEMPLATES["numeric"]) for p in synthetic.problems("eval", n, seed=3)]


def _ready(base: str, log: Path) -> bool:
    """The command says `serving` once Serve reports every app RUNNING (engines loaded)."""
    if "serving; Ctrl-C to stop" not in log.read_text():
        return False
    models = httpx.get(f"{base}/v1/models", timeout=10).json()
    return {m["id"] for m in models.get("data", [])} == {"target", "base"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`lossaverse serve MODEL_DIR --base tiny:large` in its own process group, stopped by pid."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    sets = [*CPU_ENGINE, f"serve.port={port}", f"serve.max_tokens={CAP}", f"serve.max_body_bytes={BODY}", f"serve.max_mark_answers={MAX_ANSWERS}"]
    argv = [sys.executable, "-m", "cluster.cli", "serve", resolve_model("tiny:small"), "--base", "tiny:large"]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with log.open("w") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 480
        while not _ready(base, log):
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"serve did not come up (exit {proc.poll()}):\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, proc, log
    finally:
        proc.send_signal(signal.SIGTERM)  # the command shuts Serve and its embedded Ray down
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its process group is left
        except ProcessLookupError:
            pass


def _message(response: httpx.Response) -> str:
    """The error message: OpenAI's shape, or FastAPI's `detail` (ray.serve.llm's unknown-model 404)."""
    body = response.json()
    return body["error"]["message"] if "error" in body else str(body["detail"])


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


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


def test_max_tokens_above_the_cap_is_a_400(server):
    client = _client(server[0])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens {CAP + 1} is above this server's cap of {CAP}"):
        client.completions.create(model="target", prompt="1 + 1 =", max_tokens=CAP + 1)
    with pytest.raises(openai.BadRequestError, match=f"cap of {CAP}"):
        client.chat.completions.create(model="target", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=1000)


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_answering(server):
    base = server[0]
    url = f"{base}/v1/completions"
    cases = {
        "not json": (httpx.post(url, content=b'{"model": "target", "prompt": ', headers={"content-type": "application/json"}), 400, "not valid JSON"),
        "empty": (httpx.post(url, content=b""), 400, "empty"),
        "a list": (httpx.post(url, json=["target"]), 400, "must be a JSON object"),
        "wrong type": (httpx.post(url, json={"model": "target", "prompt": "x", "max_tokens": "many"}), 400, "max_tokens"),
        "no prompt": (httpx.post(url, json={"model": "target", "max_tokens": 4}, timeout=60), 400, "prompt"),
        "unknown model": (httpx.post(url, json={"model": "nope", "prompt": "x", "max_tokens": 4}, timeout=60), 404, "nope"),
        "too large": (httpx.post(url, json={"model": "target", "prompt": "x" * (BODY + 1)}), 413, f"limit of {BODY} bytes"),
        "prompt past the context": (httpx.post(url, json={"model": "target", "prompt": "1 + " * 200, "max_tokens": 4}, timeout=60), 400, ""),
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
    r = httpx.post(f"{server[0]}/mark", json={"answers": ANSWERS}, timeout=60)
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
        (httpx.post(url, content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (httpx.post(url, json={"answers": [{"kind": "numeric", "completion": "1"}]}), 400, "answers.0.reference: Field required"),
        (httpx.post(url, json={"answers": [{**one, "kind": "essay"}]}), 400, "unknown kind 'essay'"),
        (httpx.post(url, json={"answers": [{**one, "kind": "choice"}]}), 400, "needs `choices`"),
        (httpx.post(url, json={"answers": []}), 400, "answers"),
        (httpx.post(url, json={"answers": [one], "extra": 1}), 400, "extra"),
        (httpx.post(url, json={"answers": [one] * (MAX_ANSWERS + 1)}), 413, f"at most {MAX_ANSWERS}"),
        (httpx.post(url, json={"answers": [{**one, "completion": "x" * BODY}]}), 413, "limit"),
    ]
    for response, status, words in cases:
        assert response.status_code == status and words in _message(response), response.text[:300]
    assert httpx.post(url, json={"answers": [one]}).json()["verdicts"][0]["correct"] is True


def test_sigterm_stops_the_server_and_its_ray(server):
    base, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    assert "stopping" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/v1/models", timeout=5)


# --- checks before anything starts (no Ray) ------------------------------------------------------

def test_cpu_serving_without_a_kv_cache_size_is_refused():
    with pytest.raises(ServeError, match="kv_cache_gib"):
        plan_from_model_dir(resolve_model("tiny:small"))


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
        plan_from_args({"config": "configs/local.yaml", "model_dir": "x"})
    with pytest.raises(ServeError, match="run `lossaverse train CONFIG` first"):
        plan_from_args({"config": str(ROOT / "configs/local.yaml"), "set": [f"output_dir={tmp_path}"]})


def test_cli_refuses_a_run_without_a_trained_model(tmp_path):
    out = run_cli("serve", "configs/local.yaml", "--set", f"output_dir={tmp_path}", timeout=300)
    assert out.returncode == 2 and "run `lossaverse train CONFIG` first" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
