"""Generation on an embedded local Ray through a real OpenAI-compatible HTTP endpoint on 127.0.0.1: retries,
error rows, the API key. (The vLLM engine's faults: test_generate_faults.py; an engine's node lost mid-run:
tests/e2e/test_multinode_generate.py.)"""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from lossaverse.cluster.config import BenchmarkConfig, EndpointConfig, SamplingConfig
from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.generation.generate import Competitor, PromptStyle
from lossaverse.pipeline.generation.shards import generate_sharded
from lossaverse.pipeline.sources.benchmarks import load_items
from tests.conftest import JSONHandler, http_server

pytestmark = pytest.mark.integration


def _train_items(n):
    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed=0)
    return items.filter(pc.equal(items["split"], "train"))


def _generate(tmp_path, items, competitors, sampling, shard_items=4, lines=None):
    return generate_sharded(items, competitors, sampling, PromptStyle(), 0, tmp_path / "answers.shards",
                            tmp_path / "answers", "fp", shard_items, (lines if lines is not None else []).append, 1.0)


def _keys(table):
    return list(zip(table["competitor"].to_pylist(), table["id"].to_pylist(), table["sample"].to_pylist()))


class _Endpoint(JSONHandler):
    """A small OpenAI-compatible /v1/completions server: checks the key, fails the first call with
    503 (to be retried), rejects prompts marked TOO LONG with 400, answers the rest."""

    calls = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        if self.headers.get("Authorization") != "Bearer sekrit":
            return self.send_json(401, {"error": {"message": "bad key"}})
        if len(type(self).calls) == 1:
            return self.send_json(503, {"error": {"message": "warming up"}})
        if "TOO LONG" in body["prompt"]:
            return self.send_json(400, {"error": {"message": "This model's maximum context length is 32 tokens"}})
        words = body["prompt"].split()
        text = f" The answer is {len(words)}."
        self.send_json(200, {"choices": [{"text": text, "finish_reason": "stop", "index": 0}],
                         "usage": {"completion_tokens": 5, "prompt_tokens": len(words)}})


@pytest.fixture
def endpoint(monkeypatch):
    _Endpoint.calls = []
    monkeypatch.setenv("LV_TEST_KEY", "sekrit")
    with http_server(_Endpoint) as url:
        yield f"{url}/v1"


def test_an_openai_compatible_endpoint_competes_with_retries_and_error_rows(local_ray, tmp_path, endpoint):
    items = _train_items(8)
    rows = items.to_pylist()
    rows[5]["question"] = "TOO LONG " + rows[5]["question"]
    items = pa.Table.from_pylist(rows, schema=items.schema)
    ep = EndpointConfig(url=endpoint, api_key_env="LV_TEST_KEY", qps=50, max_retries=3, retry_wait_s=0.05, batch_size=4)
    sampling = SamplingConfig(samples=2, temperature=0.0, max_tokens=8)
    totals = _generate(tmp_path, items, [Competitor("large", "served-7b", endpoint=ep, params=7_000_000_000)], sampling)
    answers = read_table(tmp_path / "answers", ANSWERS)
    assert answers.num_rows == 16 == len(set(_keys(answers))), answers.num_rows
    assert totals["large"]["errors"] == 2, answers.filter(pc.invert(pc.is_null(answers["error"])))["error"].to_pylist()
    bad = answers.filter(pc.equal(answers["id"], rows[5]["id"])).to_pylist()
    assert {r["finish_reason"] for r in bad} == {"context_length"} and all("maximum context" in r["error"] for r in bad)
    good = answers.filter(pc.is_null(answers["error"])).to_pylist()
    assert all(r["completion"] == f" The answer is {len(r['prompt'].split())}." for r in good)
    assert all(c["path"] == "/v1/completions" and c["auth"] == "Bearer sekrit" for c in _Endpoint.calls)
    assert len(_Endpoint.calls) == 17  # 16 requests + the one 503 that was retried
    assert {c["body"]["model"] for c in _Endpoint.calls} == {"served-7b"}


def test_a_missing_api_key_is_refused_before_any_request(local_ray, tmp_path, endpoint, monkeypatch):
    monkeypatch.delenv("LV_TEST_KEY")
    ep = EndpointConfig(url=endpoint, api_key_env="LV_TEST_KEY")
    with pytest.raises(ValueError, match="LV_TEST_KEY"):
        _generate(tmp_path, _train_items(2), [Competitor("large", "m", endpoint=ep, params=10)], SamplingConfig())
    assert _Endpoint.calls == []
