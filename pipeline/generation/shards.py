"""Answers written in shards keyed by item, so an interrupted generation resumes where it stopped.

Items are sorted by id and cut into shards of `shard_items`; shard k of competitor c is the file
`<c>-<k:05d>.parquet` holding exactly one row per (item, sample) of those items. A shard file is
written to a temporary name and renamed, so it is either complete or absent: a run interrupted at
any point (Ctrl-C, a killed driver, a lost node) and started again regenerates only the missing
shards, and the union of the files has exactly one row per (item, competitor, sample).

`_state.json` holds the fingerprint of the config that produced the shards; shards written under
another config are discarded rather than mixed in. It is written atomically (a temporary file
renamed over it), and it travels with the shards: the finished folder is renamed to `answers/`
with the state inside and the state removed only after that, so a run killed at any step of the
hand-over finds its finished shards again (in `answers.shards/`, or in `answers/` with the state).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lossaverse.pipeline.generation.generate import answers_from_outputs

STATE = "_state.json"


def write_state(path: Path, state: dict) -> None:
    """Replace the state file atomically: a kill mid-write leaves the old one (and a tmp file)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _state_of(directory: Path) -> str | None:
    try:
        return json.loads((Path(directory) / STATE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def shard_items(items: pa.Table, size: int) -> list[pa.Table]:
    """Items sorted by id, cut into consecutive shards of `size` items (the last may be shorter)."""
    items = items.sort_by("id")
    return [items.slice(start, size) for start in range(0, items.num_rows, size)]


class ShardStore:
    """One folder of answer shards for one config fingerprint."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        state = self.dir / STATE
        if self.dir.exists() and _state_of(self.dir) != fingerprint:
            shutil.rmtree(self.dir)  # written under another config: not ours to resume
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".*.tmp-*"):  # a shard or state whose writer was killed mid-write
            stale.unlink()
        write_state(state, {"fingerprint": fingerprint})

    def path(self, competitor: str, index: int) -> Path:
        return self.dir / f"{competitor}-{index:05d}.parquet"

    def done(self, competitor: str, index: int) -> bool:
        return self.path(competitor, index).is_file()

    def write(self, competitor: str, index: int, table: pa.Table) -> None:
        final = self.path(competitor, index)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        tmp.replace(final)  # atomic: a shard is complete or absent


@dataclass
class Tally:
    """Per-competitor progress: prompts done of total, tokens, errors, wall time, and when each
    engine batch completed (rows of one batch reach the driver together, tagged with its
    `batch_uuid`), from which `summary` takes the steady-state throughput."""

    total: int
    done: int = 0
    tokens: int = 0
    errors: int = 0
    resumed: int = 0  # rows found complete on disk, not regenerated
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None  # the first row's arrival: start-up (engines loading) ends here
    end: float | None = None
    quarter: float | None = None  # when a quarter of the rows had arrived
    # batch id -> [arrival of its last row, tokens, rows]: one entry per engine batch, so a few
    # thousand entries for a million rows.
    batches: dict[str, list] = field(default_factory=dict)
    engines_asked: int | None = None  # engine replicas configured (None: an endpoint)
    # engine actor -> its processes seen (a restarted replica keeps its actor, in a new process)
    engines: dict[str, set] = field(default_factory=dict)
    started: bool = False  # its wave of engines began (lossaverse.pipeline.generation.generate.engine_waves)
    turn_on: str | None = None  # the model whose engine it waits its turn on (weights loaded in turn)
    reported_end: bool = False  # its last progress line was printed

    def add(self, tokens: int, error: bool, batch: str | None = None, engine: tuple | None = None) -> None:
        """One answer row arrived at the driver; `engine` is (actor id, pid) of the engine that
        produced it."""
        now = time.perf_counter()
        if engine is not None and engine[0] is not None:
            self.engines.setdefault(engine[0], set()).add(engine[1])
        self.first = self.first or now
        self.done += 1
        self.tokens += tokens
        self.errors += error
        if self.quarter is None and self.done * 4 >= self.total:
            self.quarter = now
        if batch is not None:
            entry = self.batches.setdefault(batch, [now, 0, 0])
            entry[0], entry[1], entry[2] = now, entry[1] + tokens, entry[2] + 1

    def waiting(self) -> str:
        """What it waits for before its first answer."""
        return f"waiting its turn on {self.turn_on}'s engine" if self.turn_on else "engines starting"

    def line(self, name: str) -> str:
        """The progress line. Rates run from the first answer on: the engines' start-up before it
        would turn one early answer into an ETA of days. No ETA until two batches have come back."""
        now = self.end or time.perf_counter()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        head = f"generate {name}: {self.done}/{self.total} prompts ({pct:.0f}%)"
        if self.first is None:
            return f"{head}, {self.waiting()} ({now - self.start:.0f}s)"
        running = now - self.first
        if len(self.batches) < 2 and self.done < self.total or running <= 0:
            return f"{head}, first answers after {self.first - self.start:.0f}s, {self.errors} errors"
        if self.done >= self.total:  # the end: rates over the whole wall time, engine start included
            wall = now - self.start
            return (f"{head} in {wall:.0f}s (first answers after {self.first - self.start:.0f}s), "
                    f"{self.done / wall:,.1f} rows/s, {self.tokens / wall:,.0f} tokens/s, {self.errors} errors")
        rows, tokens = self.done / running, self.tokens / running
        eta = (self.total - self.done) / rows if rows else 0.0
        return f"{head}, {rows:,.1f} rows/s, {tokens:,.0f} tokens/s, {self.errors} errors, ETA {eta:.0f}s"

    def summary(self) -> dict:
        """Totals, start-up (time to the first answer) and the steady-state figures of
        `steady_state` over the batch completions (`steady_tokens_per_s` is None when too few
        batches completed to measure it)."""
        wall = (self.end or time.perf_counter()) - self.start
        first = self.first or self.start
        steady = steady_state([(t, tok) for t, tok, _ in self.batches.values()])
        # When each wave of batches completed, in seconds from the start: a timeline for the bench
        # report, capped so a long run's manifest stays small.
        ends = steady.pop("wave_ends")
        steady["wave_ends_s"] = [round(t - self.start, 2) for t in ends] if len(ends) <= 100 else None
        return {"rows": self.done + self.resumed, "generated": self.done, "resumed": self.resumed, "tokens": self.tokens,
                "errors": self.errors, "seconds": round(wall, 2), "startup_s": round(first - self.start, 2),
                "quarter_s": round((self.quarter or first) - self.start, 2),
                "tokens_per_s": round(self.tokens / wall, 1) if wall > 0 else 0.0,
                "batches": len(self.batches), **steady, **self.engine_summary()}

    def engine_summary(self) -> dict:
        """Engine replicas asked for, those that produced answers, and their restarts."""
        if self.engines_asked is None:
            return {}
        restarts = sum(len(pids) - 1 for pids in self.engines.values())
        return {"engines_asked": self.engines_asked, "engines_ran": len(self.engines), "engine_restarts": restarts}


MIN_WAVES = 3  # completion waves after the first one that a steady-state figure needs
WAVE_GAP_S = 0.05  # completions closer than this belong to one wave


def steady_state(completions: list[tuple[float, int]], min_waves: int = MIN_WAVES) -> dict:
    """Steady-state tokens/s from engine batch completions `(time, tokens)`.

    Batches that complete together (several in flight in one engine, or one per replica) form a
    wave: a completion joins the previous wave when it follows it by less than a quarter of the
    mean gap between completions, or by less than `WAVE_GAP_S`. The rate is the tokens of every wave after the first over the
    time from the first wave's last completion to the last completion, so start-up and the first
    wave are left out and no interval is shorter than a wave apart. With fewer than `min_waves`
    waves after the first the figure would rest on one or two gaps (e.g. two batches arriving a
    few milliseconds apart), so it is refused: `steady_tokens_per_s` None, `steady_note` says why.
    """
    done = sorted(completions)
    out = {"steady_tokens_per_s": None, "steady_waves": 0, "steady_note": None, "wave_ends": []}
    if len(done) < 2:
        out["steady_note"] = f"{len(done)} batch(es) completed; a steady-state rate needs {min_waves + 1} waves"
        return out
    # At least WAVE_GAP_S: batches in flight together in one engine end within milliseconds of
    # each other, which is less than a quarter of the mean gap when they all end together.
    tolerance = max(0.25 * (done[-1][0] - done[0][0]) / (len(done) - 1), WAVE_GAP_S)
    waves = [[done[0]]]
    for prev, cur in zip(done, done[1:]):
        if cur[0] - prev[0] <= tolerance:
            waves[-1].append(cur)
        else:
            waves.append([cur])
    out["steady_waves"] = len(waves) - 1
    out["wave_ends"] = [wave[-1][0] for wave in waves]
    if len(waves) - 1 < min_waves:
        out["steady_note"] = (f"{len(done)} batches completed in {len(waves)} wave(s); a steady-state rate needs "
                              f"{min_waves + 1}: give more prompts")
        return out
    start = waves[0][-1][0]
    tokens = sum(tok for wave in waves[1:] for _, tok in wave)
    out["steady_tokens_per_s"] = round(tokens / (done[-1][0] - start), 1)  # > 0: waves are apart by definition
    return out


# Where a terminal shows progress bars (the command line sets it there, lossaverse.cluster.progress),
# every row's tally update goes to it, and the interval lines are left out; the closing line stays.
PROGRESS: ContextVar[Callable[[str, Tally], None] | None] = ContextVar("progress", default=None)


def write_shards(rows: Iterable[dict], store: ShardStore, pending: dict[str, dict[int, pa.Table]], samples: int,
                 tallies: dict[str, Tally], report: Callable[[str], None], interval_s: float) -> None:
    """Group streamed output rows by (competitor, shard); write each shard when its last row arrives.

    Rows are keyed by (item, sample) within a shard, so a batch that Ray retries after an engine
    died cannot add a duplicate. Memory holds the open shards only. Progress: a line per model every
    `interval_s`, or each row to PROGRESS where it is set.
    """
    show = PROGRESS.get()
    shard_of = {
        (competitor, item_id): index
        for competitor, shards in pending.items()
        for index, table in shards.items()
        for item_id in table["id"].to_pylist()
    }
    open_shards: dict[tuple[str, int], dict[tuple[str, int], dict]] = {}
    written: set[tuple[str, int]] = set()
    last = time.perf_counter()
    for row in rows:
        competitor = row["competitor"]
        index = shard_of[(competitor, row["id"])]
        if (competitor, index) in written:
            continue  # a late duplicate of a row already in a written shard
        buf = open_shards.setdefault((competitor, index), {})
        key = (row["id"], int(row["sample"]))
        if key in buf:
            continue
        buf[key] = row
        tally = tallies[competitor]
        tally.add(int(row.get("num_generated_tokens") or 0), bool(row.get("__inference_error__") or row.get("api_error")),
                  row.get("batch_uuid"), (row.get("engine_actor"), row.get("engine_pid")))
        finished = False
        if len(buf) == pending[competitor][index].num_rows * samples:
            table = answers_from_outputs([buf[k] for k in sorted(buf)])
            store.write(competitor, index, table)
            del open_shards[(competitor, index)]
            written.add((competitor, index))
            if tally.done == tally.total:
                tally.end = time.perf_counter()
                tally.reported_end = finished = True
        if show is not None:
            show(competitor, tally)  # a finished model's bar goes before its closing line is printed
        if finished:
            report(tally.line(competitor))
        if show is None and time.perf_counter() - last >= interval_s:
            last = time.perf_counter()
            for name, t in tallies.items():  # the models whose engines run now, one line each
                if t.total and t.started and t.end is None:
                    report(t.line(name))
    for name, t in tallies.items():
        t.end = t.end or time.perf_counter()
        if show is not None:
            show(name, t)
        if t.total and not t.reported_end:
            report(t.line(name))


def missing_rows(store: ShardStore, shards: dict[str, list[pa.Table]], samples: int) -> list[str]:
    """(competitor, shard) files absent or of the wrong size after a run: should be none."""
    problems = []
    for competitor, tables in shards.items():
        for index, table in enumerate(tables):
            path = store.path(competitor, index)
            want = table.num_rows * samples
            if not path.is_file():
                problems.append(f"{path.name}: missing")
                continue
            got = pq.read_table(path, columns=["id", "sample"])
            keys = set(zip(got["id"].to_pylist(), got["sample"].to_pylist()))
            if got.num_rows != want or len(keys) != want or not pc.all(pc.is_in(got["id"], table["id"])).as_py():
                problems.append(f"{path.name}: {got.num_rows} rows ({len(keys)} distinct), expected {want}")
    return problems


def generate_sharded(items: pa.Table, competitors: list, sampling, style, seed: int, work_dir: Path, final_dir: Path,
                     fingerprint: str, shard_size: int, report: Callable[[str], None], interval_s: float = 10.0,
                     at_once: int | None = None) -> dict:
    """Generate every competitor's answers on `items` into `final_dir`, resuming from `work_dir`.

    Returns per-competitor totals (rows, generated, resumed, tokens, errors, seconds, tokens/s).
    Raises RuntimeError if a shard came out incomplete (it never should: a failed prompt is a row).
    """
    from lossaverse.pipeline.generation.generate import stream_answers  # deferred: tests patch it

    work_dir, final_dir = Path(work_dir), Path(final_dir)
    if not work_dir.exists() and _state_of(final_dir) == fingerprint:
        final_dir.rename(work_dir)  # killed after the hand-over's rename: the shards are these
    store = ShardStore(work_dir, fingerprint)
    all_shards = shard_items(items, shard_size)
    samples = sampling.samples
    pending = {c.name: {i: t for i, t in enumerate(all_shards) if not store.done(c.name, i)} for c in competitors}
    tallies = {}
    for c in competitors:
        todo = sum(t.num_rows for t in pending[c.name].values()) * samples
        asked = c.engine.concurrency if getattr(c, "engine", None) is not None and getattr(c, "endpoint", None) is None else None
        turn_on = c.engine_name if getattr(c, "reload", False) and c.engine_name != c.name else None
        tallies[c.name] = Tally(total=todo, resumed=items.num_rows * samples - todo, engines_asked=asked, turn_on=turn_on)
        if tallies[c.name].resumed:
            report(f"generate {c.name}: resuming, {len(all_shards) - len(pending[c.name])}/{len(all_shards)} shards already written")
    def on_wave(names: list[str]) -> None:  # the progress clock of a model starts with its engines
        for name in names:
            tallies[name].start, tallies[name].started = time.perf_counter(), True
            if (show := PROGRESS.get()) is not None and tallies[name].total:
                show(name, tallies[name])

    rows = stream_answers({name: list(p.values()) for name, p in pending.items()}, competitors, sampling, seed, style,
                          at_once, on_wave)
    write_shards(rows, store, pending, samples, tallies, report, interval_s)
    problems = missing_rows(store, {c.name: all_shards for c in competitors}, samples)
    if problems:
        raise RuntimeError("generation left incomplete shards: " + "; ".join(problems[:5]))
    publish(store.dir, final_dir)
    return {name: t.summary() for name, t in tallies.items()}


def publish(work_dir: Path, final_dir: Path) -> None:
    """Hand the finished shards over to `final_dir`, in steps each of which a kill may follow:
    the old `final_dir` goes, the folder is renamed (state inside), then the state is removed.
    Until the rename the shards are in `work_dir` with their state; after it in `final_dir` with
    their state (picked up by `generate_sharded`); only the last step leaves a plain answers folder,
    and that is complete."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    work_dir.rename(final_dir)
    (final_dir / STATE).unlink()
