"""Answer shards: complete-or-absent files, one row per (item, sample), resume without regenerating."""

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lossaverse.cluster.config import BenchmarkConfig, SamplingConfig
from lossaverse.pipeline.generation.generate import expand_requests
from lossaverse.pipeline.generation.shards import ShardStore, Tally, missing_rows, shard_items, write_shards
from lossaverse.pipeline.sources.benchmarks import load_items


def _items(n):
    items, _ = load_items(BenchmarkConfig(n_train=n, n_eval=1), seed=0)
    return items.filter(pc.equal(items["split"], "train"))


def _outputs(items, competitor, samples):
    """What the processor streams back: request rows plus the engine's output columns."""
    reqs = expand_requests(items, competitor, "m", SamplingConfig(samples=samples, max_tokens=4), seed=0)
    return [{**r, "generated_text": f" The answer is {r['sample']}.", "num_generated_tokens": 3} for r in reqs]


def test_shards_are_consecutive_id_ranges_covering_every_item():
    items = _items(10)
    shards = shard_items(items, 4)
    assert [s.num_rows for s in shards] == [4, 4, 2]
    ids = [i for s in shards for i in s["id"].to_pylist()]
    assert ids == sorted(items["id"].to_pylist())


def test_each_shard_is_written_once_complete_and_duplicates_are_dropped(tmp_path):
    items = _items(6)
    shards = shard_items(items, 4)
    store = ShardStore(tmp_path / "s", "fp")
    rows = _outputs(items, "small", samples=2)
    rows = rows + rows[:3]  # a retried batch delivers some rows again
    tallies = {"small": Tally(total=12)}
    lines = []
    write_shards(iter(rows), store, {"small": dict(enumerate(shards))}, 2, tallies, lines.append, interval_s=1e9)
    assert missing_rows(store, {"small": shards}, 2) == []
    t0 = pq.read_table(store.path("small", 0))
    assert t0.num_rows == 8 and len(set(zip(t0["id"].to_pylist(), t0["sample"].to_pylist()))) == 8
    assert tallies["small"].done == 12 and tallies["small"].tokens == 36
    assert lines and lines[-1].startswith("generate small: 12/12 prompts (100%)")


def test_an_interrupted_stream_leaves_no_partial_shard(tmp_path):
    items = _items(6)
    shards = shard_items(items, 4)
    store = ShardStore(tmp_path / "s", "fp")
    rows = _outputs(items, "small", samples=2)
    first_shard_ids = set(shards[0]["id"].to_pylist())
    stream = [r for r in rows if r["id"] in first_shard_ids] + [r for r in rows if r["id"] not in first_shard_ids][:2]
    write_shards(iter(stream), store, {"small": dict(enumerate(shards))}, 2, {"small": Tally(total=12)}, print, 1e9)
    assert store.done("small", 0) and not store.done("small", 1)
    assert missing_rows(store, {"small": shards}, 2) == ["small-00001.parquet: missing"]
    # Resumed under the same fingerprint: the finished shard is kept; under another it is discarded.
    assert ShardStore(tmp_path / "s", "fp").done("small", 0)
    assert not ShardStore(tmp_path / "s", "other").done("small", 0)


def test_missing_rows_names_a_short_shard(tmp_path):
    items = _items(4)
    shards = shard_items(items, 4)
    store = ShardStore(tmp_path / "s", "fp")
    rows = _outputs(items, "small", samples=1)
    from lossaverse.pipeline.generation.generate import answers_from_outputs

    store.write("small", 0, answers_from_outputs(rows[:3]))
    assert missing_rows(store, {"small": shards}, 1) == ["small-00000.parquet: 3 rows (3 distinct), expected 4"]


def test_the_progress_line_counts_from_the_first_answer_not_from_the_engines_start():
    """Engines take 100 s to start; then 4 batches of 8 rows (10 tokens each) come back 1 s apart.
    From the first answer (t=100) to t=104: 32 rows / 4 s = 8 rows/s, 320 tokens / 4 s = 80
    tokens/s, 480 rows left: ETA 60 s. Counted from the engines' start it would be 13,000 s after
    the first row, the "ETA 248217s" of a slow start."""
    t = Tally(total=512, start=0.0)
    assert "engines starting" in t.line("large")
    # a model whose weights wait for another's to finish in the one engine they share
    assert ", waiting its turn on target-base's engine (" in Tally(total=400, start=0.0, turn_on="target-base").line("target-kto")
    t.first, t.end = 100.0, 100.0
    t.done, t.tokens, t.batches = 1, 10, {"b0": [100.0, 10, 1]}
    assert t.line("large") == "generate large: 1/512 prompts (0%), first answers after 100s, 0 errors"  # no ETA yet
    t.done, t.tokens, t.end = 32, 320, 104.0
    t.batches = {f"b{i}": [101.0 + i, 80, 8] for i in range(4)}
    assert t.line("large") == "generate large: 32/512 prompts (6%), 8.0 rows/s, 80 tokens/s, 0 errors, ETA 60s"
    # The last line: rates over the whole wall time (engine start included), no ETA.
    t.done, t.tokens, t.end = 512, 5120, 164.0
    assert t.line("large") == ("generate large: 512/512 prompts (100%) in 164s (first answers after 100s), "
                               "3.1 rows/s, 31 tokens/s, 0 errors")


def test_on_a_terminal_a_bar_follows_every_row_and_no_interval_line_is_printed(tmp_path):
    """The command line's rich bars (lossaverse.cluster.progress) through the PROGRESS hook: one bar
    per model while it generates, gone at its end; the closing line is still printed after it."""
    import io

    from rich.console import Console

    from lossaverse.cluster.progress import bars

    items = _items(6)
    shards = shard_items(items, 4)
    rows = _outputs(items, "small", samples=2)
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    seen, lines = [], []
    with bars(console, True) as hook:
        def spy(name, tally):
            seen.append((name, tally.done, tally.end is not None))
            hook(name, tally)

        from lossaverse.pipeline.generation.shards import PROGRESS

        PROGRESS.set(spy)
        write_shards(iter(rows), ShardStore(tmp_path / "s", "fp"), {"small": dict(enumerate(shards))}, 2,
                     {"small": Tally(total=12)}, lines.append, interval_s=0.0)  # 0: a line every row without bars
        assert not hook.tasks  # the finished model's bar is gone
    assert [done for _, done, _ in seen][:12] == list(range(1, 13)) and seen[11][2]
    assert len(lines) == 1 and lines[0].startswith("generate small: 12/12 prompts (100%)")
    assert "generate small" in out.getvalue() and "/12" in out.getvalue()
    with bars(console, False) as off:  # off a terminal: no hook, the interval lines
        assert off is None
