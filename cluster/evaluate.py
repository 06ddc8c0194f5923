"""The evaluate stage: the target before training and after each method (and the recipe's SFT step,
and SFT's curve points while tuning) answer the eval (or validation) items; accuracy, 95% CIs and
paired differences in eval/results.json, then report.md."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.cluster.config import RunConfig
from lossaverse.cluster.recipe import curve_exports
from lossaverse.cluster.stages import (
    StageError,
    generate_into,
    mark_answers,
    need_dir,
    prompt_style,
    split_of,
    stage_fingerprints,
    trained_dirs,
)
from lossaverse.pipeline.data.rundir import fingerprint, read_table, write_json
from lossaverse.pipeline.data.schemas import ITEMS, MARKED
from lossaverse.pipeline.generation.generate import Competitor
from lossaverse.pipeline.generation.weights import reload_reason
from lossaverse.pipeline.models.adapters import lora_chain, stack_adapters, unstackable, vllm_rank, zero_adapter
from lossaverse.pipeline.report.evalstats import (
    TRANSFER,  # the transfer benchmark's split and results folder
    evaluation_results,
    models_of,
)
from lossaverse.pipeline.report.report import render_report
from lossaverse.pipeline.sources.benchmarks import load_items

RECIPE_SFT = "target-recipe-sft"  # the evaluated name of train.recipe sft_then_kto's SFT step
CURVE_PREFIX = "target-sft-"  # + a step of train.sft_curve: the SFT run's model after that step


# The KV-cache block of evaluate's CPU engines: the CPU attention backend's smallest (a multiple of
# 32) instead of vLLM's CPU default of 128. The prefix cache keeps whole blocks, so the prefix every
# prompt shares (system turn and worked examples: 168 of SmolLM2's 194 prompt tokens) is reused to
# within 32 tokens rather than 128 (hit rate 65.8% in the engine's log with 128). LLM.generate,
# SmolLM2 bf16, the default job's 400 eval prompts, greedy, 2 cores: 22.1 s against 29.9 s, the
# same 400 answers; evaluate, 5 models: the same 2,000. The generate stage keeps vLLM's default:
# there 32 changed 1 of 1,024 sampled answers (seed 1), and with them the default job's figures.
EVAL_CPU_BLOCK_TOKENS = 32


def eval_engine(engine):
    """The target's engine as evaluate runs it: on CPU with 32-token cache blocks
    (EVAL_CPU_BLOCK_TOKENS), unless the config's engine_kwargs set block_size."""
    if engine.num_gpus or "block_size" in engine.engine_kwargs:
        return engine
    return engine.model_copy(update={"engine_kwargs": {**engine.engine_kwargs, "block_size": EVAL_CPU_BLOCK_TOKENS}})


def eval_models(cfg: RunConfig, run_dir: Path) -> list:
    """The evaluated models: the untrained target (`target-base`), then each trained method
    (`target-kto`, `target-dpo`, ...)."""
    from lossaverse.pipeline.models.tinymodels import resolve_model  # deferred: tests patch it

    engine = eval_engine(cfg.engine_for(cfg.target))
    style = prompt_style(cfg, cfg.target)
    models = [Competitor("target-base", resolve_model(cfg.target.path), cfg.target.chat, engine=engine, style=style)]
    methods = cfg.train.methods
    recipe = cfg.train.recipe == "sft_then_kto"
    if recipe and cfg.evaluate.sft_curve:  # the SFT run's curve points, earliest first
        for step, folder in curve_exports(cfg, run_dir):
            if not (folder / "config.json").is_file():
                raise StageError(f"{folder} is missing: the SFT run exports it with train.sft_curve; run `lossaverse train` first")
            models.append(Competitor(f"{CURVE_PREFIX}{step}", str(folder.resolve()), cfg.target.chat, engine=engine, style=style))
    if not cfg.evaluate.baselines:
        methods = methods[:1]
    if recipe:  # baselines first, so that each pair reads "the recipe's KTO - baseline"
        methods = methods[1:] + methods[:1]
    for method in methods:
        model_dir = trained_dirs(cfg, run_dir, method)[0]
        if not (model_dir / "config.json").is_file():
            raise StageError(f"{model_dir} is missing: run `lossaverse train` (or `lossaverse run`) first")
        if recipe and method == cfg.train.method and cfg.evaluate.baselines:  # the recipe's first step alone: where its KTO started
            sft = run_dir / "recipe" / "sft" / "model"
            if not (sft / "config.json").is_file():
                raise StageError(f"{sft} is missing: run `lossaverse train` (or `lossaverse run`) first")
            models.append(Competitor(RECIPE_SFT, str(sft.resolve()), cfg.target.chat, engine=engine, style=style))
        models.append(Competitor(f"target-{method}", str(model_dir.resolve()), cfg.target.chat, engine=engine, style=style))
    return models


def lora_engine(models: list, out: Path) -> tuple[list, str | None]:
    """The evaluated models as LoRA adapters of the untrained target, all answered by its one engine
    (with vLLM's `enable_lora`), or the models unchanged and why not. A model trained from another
    trained model (the recipe's KTO step) is the chain of adapters back to the base, stacked into one
    in `out/<name>` (lossaverse.pipeline.models.adapters)."""
    base, trained = models[0], models[1:]
    chains = {m.name: lora_chain(m.model) for m in trained}
    if not trained or any(c is None for c in chains.values()):
        return models, "a model was trained without LoRA"
    if any(Path(c.base).resolve() != Path(base.model).resolve() for c in chains.values()):
        return models, "a model's adapters are not on the untrained target"
    if (why := next((w for c in chains.values() if (w := unstackable(c.adapters))), None)) is not None:
        return models, why
    rank = vllm_rank(max(c.rank for c in chains.values()))
    slots = len(trained) + 1  # the base is a (zero) adapter too: see zero_adapter
    lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": slots, "max_cpu_loras": slots}
    engine = base.engine.model_copy(update={"engine_kwargs": {**base.engine.engine_kwargs, **lora}})
    zero = zero_adapter(chains[trained[0].name].adapters[0], out / base.name)
    shared = [replace(base, engine=engine, lora=str(zero.resolve()), shared_engine=base.name)]
    for m in trained:
        adapter = stack_adapters(chains[m.name].adapters, out / m.name)
        shared.append(replace(m, model=base.model, engine=engine, lora=str(Path(adapter).resolve()), shared_engine=base.name))
    return shared, None


def reload_engine(models: list) -> tuple[list, str | None]:
    """The evaluated models all answered by one engine of the untrained target, each model's own
    weights loaded into it in turn (lossaverse.pipeline.generation.weights), or the models
    unchanged and why not: a model whose architecture, tokenizer or sampling defaults differ from
    the target's needs an engine of its own."""
    base = models[0]
    if len(models) < 2:
        return models, "one model"
    why = next((w for m in models[1:] if (w := reload_reason(base.model, m.model, base.engine.dtype))), None)
    if why is not None:
        return models, why
    return [replace(m, engine=base.engine, shared_engine=base.name, reload=True) for m in models], None


def run_evaluate(cfg: RunConfig, run_dir: Path) -> dict:
    """The target before training and after each method on the eval split (`evaluate.split:
    validation` while tuning); eval/results.json holds accuracy, items and a 95% CI per model and
    each pair's paired difference and McNemar p (lossaverse.pipeline.report.evalstats). With `evaluate.transfer`, a
    second benchmark's eval items (split `transfer`) are answered in the same pass, by the same
    engines, and scored apart into eval/transfer/results.json. report.md and its plots are
    rendered from the stored files."""
    items = split_of(read_table(need_dir(run_dir, "items", "generate"), ITEMS), cfg.evaluate.split)
    if items.num_rows == 0:
        raise StageError(f"no {cfg.evaluate.split} items in {run_dir / 'items'}: check benchmark.n_{cfg.evaluate.split}")
    parts = [items]
    if cfg.evaluate.transfer is not None:
        transfer = split_of(load_items(cfg.evaluate.transfer, cfg.seed)[0], "eval")
        if transfer.num_rows == 0:
            raise StageError(f"transfer benchmark {cfg.evaluate.transfer.name!r} has no usable eval items")
        parts.append(transfer.set_column(transfer.schema.get_field_index("split"), "split",
                                         pa.array([TRANSFER] * transfer.num_rows, pa.string())))
    models = eval_models(cfg, run_dir)
    # The trained models' files are part of what the answers depend on.
    stamps = [(Path(m.model) / "config.json").stat().st_mtime_ns for m in models[1:]]
    fp = fingerprint(stage_fingerprints(cfg)["evaluate"], stamps)
    out_dir = run_dir / "eval"
    way = cfg.evaluate.engines
    if way == "auto":  # see EvaluateConfig.engines
        way = "lora" if models[0].engine.num_gpus else "reload"
    engines = "one per model (evaluate.engines: per_model)"
    if way == "lora":
        models, why_not = lora_engine(models, out_dir / "adapters")
        engines = f"one per model ({why_not})" if why_not else f"one, {len(models) - 1} LoRA model(s) and the base"
    elif way == "reload":
        models, why_not = reload_engine(models)
        engines = f"one per model ({why_not})" if why_not else f"one, the weights of {len(models)} models loaded in turn"
    generate_into(cfg, pa.concat_tables(parts), models, cfg.evaluate.sampling, out_dir / "answers", fp)
    mark_answers(out_dir / "answers", out_dir / "marked", cfg.mark.batch_size, cfg.mark)
    marked = read_table(out_dir / "marked", MARKED)
    names = [m.name for m in models]
    results = evaluation_results(marked.filter(pc.not_equal(marked["split"], TRANSFER)), names, seed=cfg.seed)
    results["split"] = cfg.evaluate.split
    write_json(results, out_dir / "results.json")
    out = {**{f"{name}_accuracy": round(r["accuracy"], 4) for name, r in models_of(results).items()},
           "split": cfg.evaluate.split, "engines": engines, "models": models_of(results), "pairs": results["pairs"]}
    if cfg.evaluate.transfer is not None:
        tr = evaluation_results(marked.filter(pc.equal(marked["split"], TRANSFER)), names, seed=cfg.seed)
        tr["benchmark"] = cfg.evaluate.transfer.name
        write_json(tr, out_dir / TRANSFER / "results.json")
        out["transfer"] = {"benchmark": cfg.evaluate.transfer.name, "models": models_of(tr), "pairs": tr["pairs"]}
    if cfg.round == 1 or cfg.rounds.count == 1:
        out["report"] = render_report(cfg.top_dir)["report"]
    return out
