"""`lossaverse serve configs/local.yaml` on the real packaged model, called with the `openai` client.

The command serves the run's trained model (`<run_dir>/model`) and, with `serve.base_model_id`,
the config's target beside it: the packaged reference `smollm2:135m-instruct`, resolved to its
converted directory (checked on the plan, without Ray). The trained model is stood in for by that
converted directory itself (a merged LoRA export has the same layout: safetensors, tokenizer, chat
template), linked into a fresh run directory, so no training runs. Token counts prove what reached
the engine: a chat request's prompt is the tokenizer's chat-template rendering, a completions
prompt is tokenized as given.

Cost on 2 CPU cores: one vLLM CPU engine; the server is up in about 1-2 minutes on an idle machine
(several under load), the requests take seconds.
"""

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

from tests.conftest import ROOT, stop_group

pytestmark = pytest.mark.e2e

REF = "smollm2:135m-instruct"
CAP = 64  # serve.max_tokens
STARTUP_S = 900  # engine start under a loaded 2-core machine
MESSAGES = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
RAW_PROMPT = "Question: What is 2 + 3?\nAnswer:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(base: str, log: Path) -> bool:
    """The command says `serving` once Serve reports every app RUNNING (engines loaded)."""
    if "serving; Ctrl-C to stop" not in log.read_text():
        return False
    models = httpx.get(f"{base}/v1/models", timeout=10).json()
    return [m["id"] for m in models.get("data", [])] == ["target"]


def _run_dir_with_model(out: Path, model_dir: str) -> Path:
    """A run directory of configs/local.yaml under `out` whose trained model is `model_dir`."""
    (out / "local").mkdir(parents=True)
    (out / "local" / "model").symlink_to(model_dir, target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
    from lossaverse.pipeline.models.tinymodels import resolve_model

    return resolve_model(REF)  # fetched and converted on first use, then cached


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_dir):
    """`lossaverse serve configs/local.yaml` in its own process group, stopped by pid."""
    out = _run_dir_with_model(tmp_path_factory.mktemp("runs"), smollm2_dir)
    port = _free_port()
    log = out / "serve.log"
    sets = [f"output_dir={out}", f"serve.port={port}", f"serve.max_tokens={CAP}", "serve.marker=false"]
    argv = [sys.executable, "-m", "lossaverse", "serve", str(ROOT / "configs" / "local.yaml")]
    for s in sets:
        argv += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    began = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + STARTUP_S
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


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


def _ids(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list (transformers 4) or a BatchEncoding (5)."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_the_packaged_target_is_served_beside_the_trained_model(tmp_path, smollm2_dir):
    from lossaverse.cluster.serve import plan_for
    from lossaverse.serving.model import llm_config

    out = _run_dir_with_model(tmp_path, smollm2_dir)
    plan = plan_for(ROOT / "configs" / "local.yaml", None, [f"output_dir={out}", "serve.base_model_id=base"])
    assert list(plan.models) == ["target", "base"]
    assert {Path(src).resolve() for src in plan.models.values()} == {Path(smollm2_dir).resolve()}
    assert plan.engine.num_gpus == 0 and plan.max_tokens < plan.engine.max_model_len
    # No kv_cache_gib in the config: the CPU engine's cache is sized from the model.
    assert llm_config("target", plan.models["target"], plan.engine, plan.serve).engine_kwargs["kv_cache_memory_bytes"] > 0


def test_chat_completions_apply_the_models_chat_template(server, tokenizer):
    expected = _ids(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True))
    raw = len(tokenizer(MESSAGES[0]["content"], add_special_tokens=False)["input_ids"])
    assert len(expected) > raw + 10  # the template's system turn and role markers are tokens too
    r = _client(server[0]).chat.completions.create(model="target", messages=MESSAGES, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert r.model == "target" and choice.message.role == "assistant" and choice.message.content.strip(), r
    assert choice.finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 16
    assert r.usage.prompt_tokens == len(expected), f"the engine saw {r.usage.prompt_tokens} prompt tokens, the template renders {len(expected)}"
    # The answer ends at the template's end-of-turn token, which is not part of the text.
    assert "<|im_end|>" not in choice.message.content and "<|im_start|>" not in choice.message.content


def test_completions_take_the_prompt_as_given(server, tokenizer):
    expected = len(tokenizer(RAW_PROMPT)["input_ids"])
    r = _client(server[0]).completions.create(model="target", prompt=RAW_PROMPT, max_tokens=16, temperature=0)
    assert r.usage.prompt_tokens == expected and r.choices[0].text.strip(), r
    assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 16


def test_bad_requests_are_a_400_naming_the_field(server):
    client = _client(server[0])
    with pytest.raises(openai.BadRequestError, match=f"max_tokens {CAP + 1} is above this server's cap of {CAP}") as caught:
        client.chat.completions.create(model="target", messages=MESSAGES, max_tokens=CAP + 1)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="unknown field 'frobnicate'") as caught:
        client.completions.create(model="target", prompt=RAW_PROMPT, max_tokens=4, extra_body={"frobnicate": 1})
    assert caught.value.body["param"] == "frobnicate"
    assert server[1].poll() is None


def test_sigterm_stops_the_server(server):
    base, proc, log = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, log.read_text()[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{base}/v1/models", timeout=5)
