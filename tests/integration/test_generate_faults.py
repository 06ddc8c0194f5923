"""Generation faults on an embedded local Ray with the real vLLM CPU engine and a real HTTP
endpoint: seeded prompts that chunked prefill would split (the vLLM CPU crash) beside a prompt too
long for the context (an error row), an engine that dies on every batch (bounded restarts, the
engine's error named), and an endpoint request that never succeeds (an error row, the job goes on)."""

import json
import time

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lossaverse.cluster.config import BenchmarkConfig, EndpointConfig, EngineConfig, SamplingConfig
from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.generation.generate import Competitor, PromptStyle, tokenizer_for
from lossaverse.pipeline.generation.processors import EngineFailed
from lossaverse.pipeline.generation.shards import generate_sharded
from lossaverse.pipeline.models.tinymodels import resolve_model
from lossaverse.pipeline.sources.benchmarks import load_items
from tests.conftest import JSONHandler, http_server

pytestmark = pytest.mark.integration

# 48 prompts of ~245 tokens: one engine step's budget (2048 tokens) holds 8 of them, so a batch
# overflows a step when the prompts reach the engine together.
N, PAD = 48, "Tom has 3 apples and Ann has 4 pears. " * 12
SEEDED = SamplingConfig(samples=1, temperature=0.7, max_tokens=8)  # sampled: every request is seeded


def _long_items():
    items, _ = load_items(BenchmarkConfig(n_train=N, n_eval=1), seed=0)
    rows = items.filter(pc.equal(items["split"], "train")).to_pylist()
    for r in rows:
        r["question"] = PAD + r["question"]
    return pa.Table.from_pylist(rows, schema=items.schema)


def _engine(**over):
    return EngineConfig(max_model_len=256, kv_cache_gib=0.1, enforce_eager=True, batch_size=N, **over)


def _generate(tmp_path, items, competitor, sampling):
    return generate_sharded(items, [competitor], sampling, PromptStyle(), 0, tmp_path / "answers.shards",
                            tmp_path / "answers", "fp", N, lambda line: None, 1e9)


def test_seeded_prompts_longer_than_a_step_need_no_engine_restart_and_one_too_long_is_an_error_row(local_ray, tmp_path):
    """The engine's batches overflow a step (no chunked prefill on CPU: no split, no crash), and a
    prompt longer than the context is an error row for each of its samples, not a failed job nor a
    dead engine."""
    items = _long_items()
    model = resolve_model("tiny:small")
    longest = max(len(tokenizer_for(model)(q)["input_ids"]) for q in items["question"].to_pylist())
    assert 2048 < N * longest and longest + SEEDED.max_tokens <= 256  # a batch overflows a step; each prompt fits
    rows = items.to_pylist()
    too_long = {**rows[0], "id": "too-long", "question": "How many apples " * 200 + "?"}  # far beyond max_model_len
    items = pa.Table.from_pylist(rows[:N // 2] + [too_long] + rows[N // 2:], schema=items.schema)
    sampling = SamplingConfig(samples=2, temperature=0.7, max_tokens=SEEDED.max_tokens)
    # max_restarts 0: an engine that dies even once fails the job.
    totals = _generate(tmp_path, items, Competitor("small", model, engine=_engine(max_restarts=0)), sampling)
    answers = read_table(tmp_path / "answers", ANSWERS)
    keys = set(zip(answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert answers.num_rows == len(keys) == 2 * (N + 1)  # one row per (item, sample)
    failed = answers.filter(pc.is_valid(answers["error"]))
    assert set(failed["id"].to_pylist()) == {"too-long"} and failed.num_rows == 2
    assert set(failed["finish_reason"].to_pylist()) == {"context_length"}
    ok = answers.filter(pc.is_null(answers["error"]))
    assert all(t > 0 for t in ok["completion_tokens"].to_pylist())
    t = totals["small"]
    assert t["errors"] == 2 and t["rows"] == 2 * (N + 1)
    assert (t["engines_asked"], t["engines_ran"], t["engine_restarts"]) == (1, 1, 0)


def test_an_engine_dying_on_every_batch_fails_the_job_naming_its_error(local_ray, tmp_path):
    """Chunked prefill forced back on: the crash of vLLM CPU 0.32 on a split seeded prompt. The
    replica is restarted once (max_restarts 1), dies again, and the job stops with the engine's
    error instead of restarting it forever. A step's budget of 128 tokens is below every prompt,
    so each prompt is split however the requests reach the engine: with 2048, whether one is split
    depends on how many arrive before a step, and a fast one-process engine can take them few at a time."""
    items, model = _long_items(), resolve_model("tiny:small")
    assert min(len(tokenizer_for(model)(q)["input_ids"]) for q in items["question"].to_pylist()) > 128
    engine = _engine(max_restarts=1, engine_kwargs={"enable_chunked_prefill": True, "max_num_batched_tokens": 128})
    start = time.perf_counter()
    with pytest.raises(EngineFailed, match=r"'small' kept dying and was restarted 1 time.*CPU Generator does not use offset"):
        _generate(tmp_path, items, Competitor("small", model, engine=engine), SEEDED)
    assert time.perf_counter() - start < 400


class _Flaky(JSONHandler):
    """An OpenAI-compatible /v1/completions server that answers 503 to every prompt mentioning
    item DOWN (so retries never succeed) and answers the rest."""

    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if "DOWN" in body["prompt"]:
            return self.send_json(503, {"error": {"message": "overloaded"}})
        self.send_json(200, {"choices": [{"text": " 4", "finish_reason": "stop", "index": 0}], "usage": {"completion_tokens": 1}})


def test_an_endpoint_request_failing_after_its_retries_is_an_error_row_and_the_job_goes_on(local_ray, tmp_path):
    items, _ = load_items(BenchmarkConfig(n_train=6, n_eval=1), seed=0)
    rows = items.filter(pc.equal(items["split"], "train")).to_pylist()
    rows[1]["question"] = "DOWN " + rows[1]["question"]
    items = pa.Table.from_pylist(rows, schema=items.schema)
    _Flaky.calls = 0
    with http_server(_Flaky) as url:
        ep = EndpointConfig(url=f"{url}/v1", max_retries=2, retry_wait_s=0.01, batch_size=3)
        totals = _generate(tmp_path, items, Competitor("large", "served", endpoint=ep, params=10**9),
                           SamplingConfig(samples=2, temperature=0.0, max_tokens=4))
    answers = read_table(tmp_path / "answers", ANSWERS)
    assert answers.num_rows == 12 and totals["large"]["errors"] == 2 and "engines_ran" not in totals["large"]
    failed = answers.filter(pc.is_valid(answers["error"])).to_pylist()
    assert {r["id"] for r in failed} == {rows[1]["id"]}
    assert all("no answer after 2 retries" in r["error"] and r["finish_reason"] == "error" for r in failed)
    assert set(answers.filter(pc.is_null(answers["error"]))["completion"].to_pylist()) == {" 4"}
    assert _Flaky.calls == 10 + 2 * 3  # 10 answered at once, 2 tried 1 + 2 times
