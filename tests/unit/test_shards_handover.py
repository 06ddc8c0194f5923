"""The shard state and the hand-over of finished shards to answers/: a kill at any step loses no
finished shard. A kill is simulated by an exception raised at the step (nothing after it runs);
the next run must resume every finished shard and generate nothing."""

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest

import lossaverse.pipeline.generation.generate
from lossaverse.cluster.config import BenchmarkConfig, SamplingConfig
from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.generation.generate import PromptStyle, expand_requests
from lossaverse.pipeline.generation.shards import STATE, ShardStore, generate_sharded
from lossaverse.pipeline.sources.benchmarks import load_items


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler on the way catches it."""


def _items(n):
    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed=0)
    return items.filter(pc.equal(items["split"], "train"))


class _Competitor:
    name = "small"


def _fake_stream(calls):
    """stream_answers without Ray: the engine's output rows for the shards asked for."""
    def stream(shards, competitors, sampling, seed, style, at_once=None, on_wave=None):
        calls.append(sum(t.num_rows for t in shards.get("small", [])))
        for table in shards.get("small", []):
            for r in expand_requests(table, "small", "m", sampling, seed):
                yield {**r, "generated_text": " 7", "num_generated_tokens": 1}
    return stream


def _run(tmp_path, items, calls):
    return generate_sharded(items, [_Competitor()], SamplingConfig(samples=1, max_tokens=4), PromptStyle(), 0,
                            tmp_path / "answers.shards", tmp_path / "answers", "fp", 2, lambda line: None, 1e9)


@pytest.mark.parametrize("step", ["remove the old answers", "rename shards to answers", "remove the state"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_at_any_step_of_the_hand_over_keeps_every_finished_shard(tmp_path, monkeypatch, step, when):
    items = _items(6)
    calls = []
    monkeypatch.setattr(lossaverse.pipeline.generation.generate, "stream_answers", _fake_stream(calls))
    (tmp_path / "answers").mkdir()  # an older answers folder, replaced by the hand-over
    (tmp_path / "answers" / "old.parquet").write_bytes(b"")
    import lossaverse.pipeline.generation.shards as shards

    targets = {"remove the old answers": (shards.shutil, "rmtree"), "rename shards to answers": (Path, "rename"),
               "remove the state": (Path, "unlink")}
    owner, name = targets[step]
    real = getattr(owner, name)

    def dying(*args, **kwargs):
        if when == "after":
            real(*args, **kwargs)
        raise Killed(step)

    with monkeypatch.context() as m:
        m.setattr(owner, name, dying)
        with pytest.raises(Killed):
            _run(tmp_path, items, calls)
    assert calls == [6]
    totals = _run(tmp_path, items, calls)  # the next run
    if step == "remove the state" and when == "after":
        # Everything was handed over; only the manifest entry (written by the caller) was missing,
        # and without the state the shards cannot be told apart from another config's: redone.
        assert calls == [6, 6]
    else:
        assert calls == [6, 0], f"killed {when} '{step}': the next run regenerated {calls[1]} items"
        assert totals["small"]["resumed"] == 6
    answers = read_table(tmp_path / "answers", ANSWERS)
    assert sorted(answers["id"].to_pylist()) == sorted(items["id"].to_pylist())
    assert not (tmp_path / "answers" / STATE).exists() and not (tmp_path / "answers.shards").exists()
    assert not (tmp_path / "answers" / "old.parquet").exists()


def test_the_state_file_is_replaced_atomically(tmp_path, monkeypatch):
    """A kill while the state is written leaves the previous state whole (a temporary file is
    renamed over it), so the finished shards stay recognisable."""
    ShardStore(tmp_path / "s", "fp")
    (tmp_path / "s" / "small-00000.parquet").write_bytes(b"x")
    import lossaverse.pipeline.generation.shards as shards

    def dying(*args):
        raise Killed("replace")

    with monkeypatch.context() as m:
        m.setattr(shards.os, "replace", dying)
        with pytest.raises(Killed):
            ShardStore(tmp_path / "s", "fp")
    assert json.loads((tmp_path / "s" / STATE).read_text()) == {"fingerprint": "fp"}
    assert ShardStore(tmp_path / "s", "fp").done("small", 0)  # and the leftover tmp file is swept
    assert [p.name for p in (tmp_path / "s").iterdir() if ".tmp-" in p.name] == []
