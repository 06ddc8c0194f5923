"""`train.recipe: sft_then_kto`: SFT first, then KTO on the SFT'd target's own graded answers.

The KTO paper finds that up to 7B "virtually all of the gains" come from an SFT stage before KTO,
and its authors' code (HALOs) runs SFT, then KTO; on-policy data (the target's own graded samples)
teaches more than another model's (Setlur et al., 2024; Kadlčík & Štefánik, 2024). The steps, each
in its folder under <run>/recipe/, each skipped on a re-run once its `done.json` (written last)
matches the config:

  sft/        SFT on the desirable rows of datasets/kto for `train.sft_steps` (model/, checkpoints/);
              with sft in `train.compare`, model/ is the SFT baseline's run as it stood after
              `train.sft_steps` (that run trains the whole budget, see `run_recipe`)
  on_policy/  the SFT model answers `on_policy.items` fresh train items, `on_policy.samples` times
              each (answers/, marked/: the generate and mark stages' own code and contracts)
  datasets/   kto/ = the competitors' datasets/kto rows + the on-policy rows (competitor `target`),
              divergent negatives applied to the on-policy rows when `datasets.divergent_negatives`;
              stats.json with the labels the KTO weights are computed from
  then KTO from the SFT model (TRL's reference model is a frozen copy of it) for `train.max_steps`
  into the round's model/ and checkpoints/, as a single-method run would.

Fresh items come from a block of the train split that no round answers: the block after the
validation items and the `rounds.count` rounds' blocks (`lossaverse.pipeline.sources.benchmarks.load_items` with
round = rounds.count + round), so they never overlap the competitors' items or the eval split.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.cluster.config import RunConfig, SamplingConfig
from lossaverse.pipeline.data.build import kto_table, label_counts, recommended_weights
from lossaverse.pipeline.data.divergence import split_shared_prefixes
from lossaverse.pipeline.data.rundir import fingerprint, read_json, read_table, replace_dir, write_json, write_table
from lossaverse.pipeline.data.schemas import ITEMS, MARKED, ON_POLICY
from lossaverse.pipeline.generation.generate import tokenizer_for
from lossaverse.pipeline.sources.benchmarks import BenchmarkError, load_items
from lossaverse.training.config import kto_step_fields

# The KTO step's own settings (`train.<key>`): neither the SFT step nor the on-policy answers depend
# on them, so a tune trial that changes only these trains the KTO step alone from the run's SFT start.
KTO_STEP_ONLY = kto_step_fields()  # the fields training/config.py marks KTO_STEP


def on_policy_items(cfg: RunConfig) -> pa.Table:
    """The fresh train items the SFT'd target answers (see the module docstring)."""
    block = cfg.rounds.count + cfg.round
    try:
        items, _ = load_items(cfg.benchmark, cfg.seed, block)
    except BenchmarkError as exc:
        raise BenchmarkError(f"train.recipe sft_then_kto answers fresh train items from the block after the rounds' "
                             f"items, and there are none: {exc}") from None
    items = items.filter(pc.equal(items["split"], "train"))
    n = cfg.train.on_policy.items or cfg.benchmark.n_train
    if cfg.train.on_policy.items and items.num_rows < n:
        raise BenchmarkError(f"train.on_policy.items={n}, but the block of fresh train items holds {items.num_rows} "
                             f"(one block is benchmark.n_train={cfg.benchmark.n_train} items): lower on_policy.items")
    return items.slice(0, n)


def on_policy_sampling(cfg: RunConfig) -> SamplingConfig:
    op = cfg.train.on_policy
    return cfg.generate.sampling.model_copy(update={"samples": op.samples, "temperature": op.temperature, "top_p": op.top_p})


def _done(folder: Path, fp: str) -> dict | None:
    info = read_json(folder / "done.json")
    return info["result"] if info and info.get("fingerprint") == fp else None


def _record(folder: Path, fp: str, result: dict) -> dict:
    write_json({"fingerprint": fp, "result": result}, folder / "done.json")
    return result


def on_policy_datasets(cfg: RunConfig, marked: pa.Table, competitor_kto: pa.Table, tokenizer) -> tuple[pa.Table, dict]:
    """recipe/datasets/kto: the competitors' kto rows + the on-policy answers' kto rows, and stats."""
    own = kto_table(marked)
    divergence = None
    if cfg.datasets.divergent_negatives:
        own, divergence = split_shared_prefixes(own, tokenizer)
    own = own.append_column("round", pa.array([cfg.round] * own.num_rows, pa.int32()))
    if "round" not in competitor_kto.column_names:
        competitor_kto = competitor_kto.append_column("round", pa.array([cfg.round] * competitor_kto.num_rows, pa.int32()))
    theirs = competitor_kto.select(own.column_names).cast(own.schema)
    kto = pa.concat_tables([theirs, own])
    labels = label_counts(kto)
    stats = {
        "labels": labels,
        "on_policy": {"answers": marked.num_rows, "rows": own.num_rows, "desirable": label_counts(own)["desirable"],
                      "accuracy": float(pc.mean(marked["correct"]).as_py() or 0.0) if marked.num_rows else 0.0,
                      "items": len(set(marked["id"].to_pylist()))},
        "competitor_rows": theirs.num_rows,
        "recommended_kto_weights": recommended_weights(labels["desirable"], labels["undesirable"]),
    }
    if divergence is not None:
        stats["divergence"] = divergence
    return kto, stats


def curve_folder(run_dir: Path, step: int) -> Path:
    """Where the recipe's SFT run leaves its model after `step` of `train.sft_curve`."""
    return run_dir / "recipe" / "sft_curve" / f"step-{step}"


def curve_exports(cfg: RunConfig, run_dir: Path) -> list[tuple[int, Path]]:
    return [(step, curve_folder(run_dir, step)) for step in sorted(cfg.train.sft_curve)]


def sft_settings(cfg: RunConfig, shared: bool):
    """The recipe's SFT step's training settings; `shared`: the SFT baseline's run of the whole
    budget (sft_steps + max_steps), whose model after sft_steps is the recipe's start."""
    steps = cfg.train.sft_steps + (cfg.train.max_steps if shared else 0)
    return cfg.train.for_method("sft").model_copy(update={"max_steps": steps, "recipe": "single"})


def step_fingerprints(cfg: RunConfig, datasets_fp: str, shared: bool) -> tuple[str, str, str]:
    """The fingerprints of the recipe's SFT step, on-policy answers and datasets (each step is
    skipped on a re-run while its done.json holds the same). SFT depends on the data, the target
    and the shared optimizer settings, not on the KTO step's own (KTO_STEP_ONLY): changing beta or
    the weights re-runs the KTO step alone, and a tune trial of those settings shares the steps."""
    # sft_curve only adds exports, changing no weight: a run missing its exports trains again (run_recipe).
    kto_only = KTO_STEP_ONLY | {"method", "compare", "recipe", "on_policy", "resume", "sft_curve"}
    sft_fp = fingerprint("recipe-sft", datasets_fp, cfg.target.model_dump(mode="json"),
                         sft_settings(cfg, shared).model_dump(mode="json", exclude=kto_only), shared)
    op_fp = fingerprint(sft_fp, "on_policy", cfg.train.on_policy.model_dump(), cfg.rounds.count)
    return sft_fp, op_fp, fingerprint(op_fp, "datasets", cfg.datasets.model_dump())


def run_recipe(cfg: RunConfig, run_dir: Path, base_model: str, train_one: Callable[..., dict],
               answer_one: Callable[..., dict], report: Callable[[str], None], fp: str, datasets_fp: str,
               sft_dirs: tuple[Path, Path] | None = None) -> dict:
    """sft_then_kto for one round; returns the KTO step's training result plus `recipe` (each step's
    summary). The train stage hands in its own steps: `train_one(train, model, datasets_dir, out,
    storage, fp, export_at=())` trains one method; `answer_one(players, items, sampling, folder,
    fp)` generates the players' answers into folder/answers and marks them into folder/marked (the
    generate and mark stages' code), returning the mark summary. `datasets_fp` is the datasets
    stage's fingerprint.

    With `sft_dirs` (the SFT baseline's model and checkpoint folders, when `train.compare` holds
    sft) the recipe's SFT step and the SFT baseline are one run: SFT for the whole budget (sft_steps
    + max_steps) into `sft_dirs`, whose model after `sft_steps` is exported into recipe/sft/model.
    The KTO step, RFT and the rest of that SFT run then all start from that one checkpoint and run
    the same steps; the result's `shared_sft` is the SFT baseline's training result."""
    folder = run_dir / "recipe"
    sft_dir = folder / "sft"
    sft_train = sft_settings(cfg, sft_dirs is not None)
    sft_fp, op_fp, data_fp = step_fingerprints(cfg, datasets_fp, sft_dirs is not None)
    # The SFT run's checkpoints also depend on its exports: `--resume` past a curve step added since
    # would never write it.
    storage_fp = fingerprint(sft_fp, sorted(cfg.train.sft_curve)) if cfg.train.sft_curve else sft_fp
    sft = _done(sft_dir, sft_fp)
    if sft is not None and (missing := [k for k, f in curve_exports(cfg, run_dir) if not (f / "config.json").is_file()]):
        report(f"recipe: the SFT run again, to export its model after steps {missing} (train.sft_curve)")
        sft = None
        for later in ("on_policy", "datasets"):  # they answered with, and were built from, the model it replaces
            (folder / later / "done.json").unlink(missing_ok=True)
    if sft is None and sft_dirs is None:
        report(f"recipe: sft ({cfg.train.sft_steps} steps)")
        sft = _record(sft_dir, sft_fp, train_one(sft_train, base_model, run_dir / "datasets", sft_dir / "model",
                                                 sft_dir / "checkpoints", storage_fp, export_at=curve_exports(cfg, run_dir)))
    elif sft is None:
        report(f"recipe: sft ({sft_train.max_steps} steps, the SFT baseline; the model after step "
               f"{cfg.train.sft_steps} is the recipe's SFT start)")
        sft = _record(sft_dir, sft_fp, train_one(sft_train, base_model, run_dir / "datasets", sft_dirs[0], sft_dirs[1],
                                                 storage_fp, export_at=[(cfg.train.sft_steps, sft_dir / "model")]
                                                 + curve_exports(cfg, run_dir)))
    sft_model = str((sft_dir / "model").resolve())

    op_dir = folder / "on_policy"
    op = _done(op_dir, op_fp)
    if op is None:
        items = on_policy_items(cfg)
        report(f"recipe: the SFT'd target answers {items.num_rows} fresh train items x {cfg.train.on_policy.samples}")
        player = cfg.target.model_copy(update={"path": sft_model, "endpoint": None})  # the target's prompt style
        marked = answer_one({ON_POLICY: player}, items.select(ITEMS.names), on_policy_sampling(cfg), op_dir, op_fp)
        op = _record(op_dir, op_fp, {**marked, "items": items.num_rows})

    data_dir = folder / "datasets"
    data = _done(data_dir, data_fp)
    if data is None:
        kto, stats = on_policy_datasets(cfg, read_table(op_dir / "marked", MARKED),
                                        read_table(run_dir / "datasets" / "kto"), tokenizer_for(base_model))
        tmp = data_dir.with_name("datasets.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_table(kto, tmp / "kto")
        write_json(stats, tmp / "stats.json")
        replace_dir(tmp, data_dir)
        data = _record(data_dir, data_fp, stats)  # after the rename: done.json is written last
    kept = "" if cfg.train.negatives == "all" else f"; train.negatives {cfg.train.negatives}: some wrong ones left out"
    report(f"recipe: kto from the SFT model ({cfg.train.max_steps} steps) on {data['labels']['total']} rows "
           f"({data['on_policy']['rows']} on-policy, on-policy accuracy {data['on_policy']['accuracy']:.3f}{kept})")
    kto_train = cfg.train.for_method("kto").model_copy(update={"recipe": "single"})
    result = train_one(kto_train, sft_model, data_dir, run_dir / "model", run_dir / "checkpoints", fingerprint(fp, data_fp, "kto"))
    result["recipe"] = {
        "name": "sft_then_kto",
        "sft": {k: v for k, v in sft.items() if k != "history"},
        "on_policy": data["on_policy"],
        "datasets": {k: v for k, v in data.items() if k != "on_policy"},
        "sft_model": sft_model,
        "sft_shared": sft_dirs is not None,
    }
    if sft_dirs is not None:
        result["shared_sft"] = sft
    return result
