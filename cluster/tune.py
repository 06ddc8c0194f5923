"""`lossaverse tune`: choose training settings on the validation items, never on the eval split.

The run's data stages (items, generate, mark, datasets) run once, as in `lossaverse run`; each
combination of the grid then trains the target and evaluates it on `benchmark.n_validation` items
carved from the train split, in a trial directory of its own (runs/<name>/tune/<trial>/, with the
run's items/ and datasets/ linked in, a manifest of its own, so a re-run skips finished trials).
tune.json ranks the trials by validation accuracy (with those of earlier tune runs on the same data,
overrides and baselines, so one-factor grids add up to one ablation table); the winner is printed as the `--set` line to
use for the real run, which then reports on the eval split.

With `train.recipe: sft_then_kto` the run's own train stage runs first, as `lossaverse run` runs it
(SFT, the on-policy answers, KTO, and the baselines of `train.compare` from the one SFT checkpoint).
Its models, evaluated on the validation items in the trial `configured`, are the baselines (SFT at
the whole budget, RFT), and a trial that changes only the KTO step's own settings (beta, the
weights, the NLL term: `shares_recipe_start`) links the run's recipe/ folder and trains the KTO step
alone from that SFT checkpoint. Every trial then reads against SFT and RFT from the same start.

Written here rather than with Ray Tune: each trial is itself a Ray Train job plus Ray Data vLLM
generation launched through the stage runner, with its own resumable run directory, and the grid
is small; Ray Tune's trial actors would wrap jobs that already schedule their own resources.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Callable

import yaml

from lossaverse.cluster.config import ConfigError, RunConfig, load_config
from lossaverse.cluster.recipe import KTO_STEP_ONLY, step_fingerprints
from lossaverse.pipeline.data.rundir import read_json, read_table, write_json
from lossaverse.pipeline.data.schemas import MARKED
from lossaverse.pipeline.report.evalstats import compare, item_scores, pair_of
from lossaverse.training.config import RECIPE_BASELINES


def parse_grid(grid: list[str]) -> dict[str, list]:
    """["train.learning_rate=1e-4,1e-3", ...] -> {"train.learning_rate": [0.0001, 0.001], ...}."""
    out: dict[str, list] = {}
    for item in grid:
        key, sep, raw = item.partition("=")
        values = [yaml.safe_load(v) for v in raw.split(",") if v.strip()]
        if not sep or not key.strip() or not values:
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,..., for example train.learning_rate=1e-4,1e-3")
        if key.strip() in out:
            raise ConfigError(f"--grid {key.strip()} is given twice")
        out[key.strip()] = values
    if not out:
        raise ConfigError("tune needs at least one --grid KEY=V1,V2,...")
    return out


def trial_name(combo: dict) -> str:
    """{"train.learning_rate": 0.001, "train.beta": 0.1} -> "learning_rate-0.001_beta-0.1"."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in combo.items()]
    return re.sub(r"[^\w.-]", "", "_".join(parts))[:120] or "trial"


def _trial_scores(trial_dir: Path, model: str) -> dict[str, float]:
    return item_scores(read_table(trial_dir / "eval" / "marked", MARKED))[model]


def shares_recipe_start(cfg: RunConfig, sets: list[str]) -> bool:
    """Whether a trial of an `sft_then_kto` config changes only the KTO step's own settings
    (lossaverse.cluster.recipe.KTO_STEP_ONLY). Such a trial starts from the run's own SFT checkpoint
    and on-policy answers (their fingerprints leave those settings out) and trains the KTO step
    alone, so each costs one KTO step and not a whole recipe."""
    if cfg.train.recipe != "sft_then_kto" or not sets:
        return False
    for item in sets:
        section, _, key = item.split("=", 1)[0].strip().partition(".")
        if section != "train" or key not in KTO_STEP_ONLY:
            return False
    return True


def link_into(trial_dir: Path, top: Path, subs: list[str]) -> None:
    """Symlink each of the run's folders `subs` (relative paths) into the trial directory."""
    for sub in subs:
        link = trial_dir / sub
        if not link.is_symlink() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((top / sub).resolve(), target_is_directory=True)


def _same_recipe_steps(trial: RunConfig, run: RunConfig) -> bool:
    """Whether the run's recipe steps are complete under the fingerprints the trial computes, so
    the trial's recipe skips them all (and writes nothing into the linked recipe/ folder)."""
    from lossaverse.cluster.stages import stage_fingerprints  # deferred: imports pandas

    def steps(c: RunConfig) -> tuple[str, str, str]:
        return step_fingerprints(c, stage_fingerprints(c)["datasets"], "sft" in c.train.methods)

    done = [(read_json(run.run_dir / "recipe" / sub / "done.json") or {}).get("fingerprint")
            for sub in ("sft", "on_policy", "datasets")]
    return steps(trial) == steps(run) == tuple(done)


def _flow(values: list[str]) -> str:
    return "[" + ", ".join(values) + "]"


def _trial_config(config: Path, overrides: list[str], sets: list[str], name: str, top: Path, compare: list[str],
                  curve: bool = False) -> RunConfig:
    """A trial's config: the validation items, its own `compare`, and no SFT curve exports but in
    `configured` (which scores the run's; a trial's own SFT run, if any, exports none)."""
    return load_config(config, overrides + sets + [f"output_dir={top / 'tune'}", f"name={name}", "evaluate.split=validation",
                                                   "evaluate.transfer=null", f"train.compare={_flow(compare)}"]
                       + ([] if curve else ["train.sft_curve=[]"]))


def _entry(tcfg: RunConfig, name: str, sets: list[str], model: str, trained_in: Path | None = None) -> dict:
    """A trial's entry of tune.json: `model`'s validation accuracy and its gain over the untrained
    target; its training figures from the manifest of `trained_in` (default: the trial's own)."""
    trial_dir = tcfg.run_dir
    results = read_json(trial_dir / "eval" / "results.json")
    pair = pair_of(results, model, "target-base")
    info = (read_json((trained_in or trial_dir) / "manifest.json") or {}).get("stages", {}).get("train", {})
    method = model.removeprefix("target-")
    entry = {"trial": name, "set": sets, "method": method, "recipe": tcfg.train.recipe,
             "validation_accuracy": results[model]["accuracy"], "ci95": results[model]["ci95"],
             "items": results[model]["items"], "base_accuracy": results["target-base"]["accuracy"],
             "gain": pair["diff"], "gain_ci95": pair["ci95"], "mcnemar_p": pair["mcnemar_p"],
             "steps": info.get("budget_steps") or info.get("steps")}
    if method == "kto" and tcfg.train.method == "kto":
        entry.update(beta=tcfg.train.beta, nll_weight=tcfg.train.nll_weight,
                     divergent_negatives=tcfg.datasets.divergent_negatives,
                     **{k: info[k] for k in ("desirable_weight", "undesirable_weight", "loss_aversion") if k in info})
    return entry


def _run_trial(config: Path, overrides: list[str], sets: list[str], name: str, top: Path,
               report: Callable[[str], None]) -> tuple[RunConfig, dict]:
    """Train and evaluate one trial on the validation items; (its config, its entry of tune.json)."""
    from lossaverse.cluster.runner import execute  # deferred: imports pandas

    cfg = load_config(config, overrides)
    shared = shares_recipe_start(cfg, sets)
    # A shared trial keeps the run's SFT baseline in `compare`: with it, the recipe's SFT step is the
    # SFT baseline's run (see run_recipe), and only then do the step fingerprints match the run's.
    compare = [m for m in cfg.train.methods if m == "sft"] if shared else []
    # Its baselines are the run's, scored once in `configured`: it scores the untrained target and its KTO.
    tcfg = _trial_config(config, overrides, sets + (["evaluate.baselines=false"] if shared else []), name, top, compare)
    if shared and not _same_recipe_steps(tcfg, cfg):  # never train into the run's own recipe/ folder
        shared, compare = False, []
        tcfg = _trial_config(config, overrides, sets, name, top, compare)
    trial_dir = tcfg.run_dir
    trial_dir.mkdir(parents=True, exist_ok=True)
    # A trial that changes how datasets/ is built builds its own from the run's marked answers.
    own_datasets = any(s.split("=", 1)[0].startswith("datasets.") for s in sets)
    link_into(trial_dir, top, ["items", "marked" if own_datasets else "datasets"])
    if shared:
        link_into(trial_dir, top, ["recipe"])
    elif (trial_dir / "recipe").is_symlink():  # left by an earlier shared run of this trial: not ours to write into
        (trial_dir / "recipe").unlink()
    report(f"[bold]trial[/] {name}: " + " ".join(f"--set {s}" for s in sets)
           + (" (from the run's SFT checkpoint and on-policy answers)" if shared else ""))
    execute(tcfg, (["datasets"] if own_datasets else []) + ["train", "evaluate"], report=report)
    return tcfg, _entry(tcfg, name, sets, f"target-{tcfg.train.method}")


def _configured(config: Path, overrides: list[str], top: Path, report: Callable[[str], None]) -> RunConfig:
    """The run's own recipe and its baselines (trained in the run directory, as `lossaverse run`
    trains them) evaluated on the validation items, in the trial directory `configured`."""
    from lossaverse.cluster.runner import execute  # deferred: imports pandas

    cfg = load_config(config, overrides)
    tcfg = _trial_config(config, overrides, ["evaluate.sft_curve=true"], "configured", top, cfg.train.compare, curve=True)
    link_into(tcfg.run_dir, top, ["items", "datasets", "recipe", "model"] + [f"compare/{m}" for m in cfg.train.methods[1:]])
    report("[bold]trial[/] configured: the run's own models on the validation items"
           + (f", with SFT's curve at steps {sorted(cfg.train.sft_curve)}" if cfg.train.sft_curve else ""))
    execute(tcfg, ["evaluate"], report=report)
    return tcfg


def sft_curve(cfg: RunConfig, results: dict) -> dict:
    """SFT's validation curve from the configured trial's results: each exported point of the SFT
    run (train.sft_curve, the recipe's start at sft_steps, the SFT baseline at the whole budget) and
    the step where SFT stopped gaining: the first point that no later point beats by a paired
    difference whose 95% CI is above 0 (ties to the earlier step: fewer SFT steps, more for KTO)."""
    from lossaverse.cluster.evaluate import CURVE_PREFIX, RECIPE_SFT  # deferred: imports pandas

    named = [(k, f"{CURVE_PREFIX}{k}") for k in cfg.train.sft_curve] + [(cfg.train.sft_steps, RECIPE_SFT)]
    if "sft" in cfg.train.methods:
        named.append((cfg.train.sft_steps + cfg.train.max_steps, "target-sft"))
    points = [{"step": k, "model": m, "accuracy": results[m]["accuracy"], "ci95": results[m]["ci95"]}
              for k, m in sorted(named) if m in results]

    def gain(later: str, earlier: str) -> dict:
        if (pair := pair_of(results, later, earlier)) is None:
            raise KeyError(f"no paired result of {later} against {earlier}")
        return pair

    stopped = None
    for i, point in enumerate(points):
        later = [gain(q["model"], point["model"]) for q in points[i + 1:]]
        if all(g["ci95"][0] <= 0 for g in later):
            stopped = point["step"]
            break
    for before, point in zip(points, points[1:]):
        g = gain(point["model"], before["model"])
        point["vs_previous"] = {"diff": g["diff"], "ci95": g["ci95"], "mcnemar_p": g["mcnemar_p"]}
    return {"points": points, "stopped_gaining_at": stopped, "sft_steps": cfg.train.sft_steps,
            "rule": "the first step no later step beats by a paired difference whose 95% CI is above 0"}


def earlier_trials(before: dict, same: dict, baseline_methods: list[str], trials: list[dict]) -> list[dict]:
    """The trials of an earlier tune.json to keep beside this run's: those on the same data, with
    the same overrides and baselines (so that one-factor grids add up to one ablation table), less
    the ones this run has run again."""
    if any(before.get(k) != v for k, v in same.items()):
        return []
    if sorted(b.get("method") for b in before.get("baselines", [])) != baseline_methods:
        return []
    names = {t["trial"] for t in trials}
    return [t for t in before.get("trials", []) if t["trial"] not in names]


def _versus(scores: dict, baselines: dict, seed: int) -> dict:
    """A trial's paired difference against each baseline on the same validation items."""
    out = {}
    for method, (_, base_scores) in baselines.items():
        pair = compare(scores, base_scores, seed=seed)
        out[method] = {k: pair[k] for k in ("items", "diff", "ci95", "mcnemar_p")}
    return out


def tune(config: Path, overrides: list[str], grid: dict[str, list], report: Callable[[str], None] = print) -> dict:
    """Run every trial of `grid` (the caller has started Ray); write and return tune.json.

    Each method in the config's `train.compare` (other than `train.method`) is trained once more as
    a baseline trial (`baseline-<method>`) with the config's whole step budget; with `recipe:
    sft_then_kto` the baselines are the run's own compared models instead (see the module
    docstring), beside the trial `configured`. Every trial gets its paired difference against each
    baseline on the same validation items (`vs`), so an ablation reads against SFT (and RFT) as
    well as against the untrained target."""
    from lossaverse.cluster.runner import execute  # deferred: imports pandas
    from lossaverse.cluster.stages import stage_fingerprints  # deferred: imports pandas

    cfg = load_config(config, overrides)
    if cfg.benchmark.n_validation == 0:
        raise ConfigError("tune chooses settings on validation items: set benchmark.n_validation (for example --set benchmark.n_validation=400)")
    if cfg.rounds.count > 1:
        raise ConfigError("tune trains one round: tune with rounds: 1, then run the rounds with the chosen settings")
    recipe = cfg.train.recipe == "sft_then_kto"
    # With the recipe, the run's own train stage (SFT, on-policy answers, KTO and the baselines from
    # one SFT checkpoint) runs once here, as `lossaverse run` would run it: its models are the
    # baselines, and trials of the KTO step's own settings start from its SFT checkpoint.
    execute(cfg, ["items", "generate", "mark", "datasets"] + (["train"] if recipe else []), report=report)
    top = cfg.top_dir
    budget = cfg.train.sft_steps + cfg.train.max_steps if recipe else cfg.train.max_steps
    baselines = {}
    trials = []
    if recipe:
        ccfg = _configured(config, overrides, top, report)
        for method in cfg.train.methods[1:]:
            entry = {**_entry(ccfg, f"baseline-{method}", [], f"target-{method}", top), "steps": budget}
            baselines[method] = (entry, _trial_scores(ccfg.run_dir, f"target-{method}"))
        trials.append(_entry(ccfg, "configured", [], f"target-{cfg.train.method}", top))
        trials[-1]["vs"] = _versus(_trial_scores(ccfg.run_dir, f"target-{cfg.train.method}"), baselines, cfg.seed)
        curve = sft_curve(cfg, read_json(ccfg.run_dir / "eval" / "results.json"))
    # Without the recipe, each compared method is trained once more as a baseline trial at the budget.
    for method in [m for m in cfg.train.compare if not recipe and m != cfg.train.method and m not in RECIPE_BASELINES]:
        sets = [f"train.method={method}", "train.recipe=single"] + ([f"train.max_steps={budget}"] if budget else [])
        bcfg, entry = _run_trial(config, overrides, sets, f"baseline-{method}", top, report)
        baselines[method] = (entry, _trial_scores(bcfg.run_dir, f"target-{method}"))
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in combo.items()]
        tcfg, entry = _run_trial(config, overrides, sets, trial_name(combo), top, report)
        if baselines:
            entry["vs"] = _versus(_trial_scores(tcfg.run_dir, f"target-{tcfg.train.method}"), baselines, cfg.seed)
        trials.append(entry)
    # Trials of earlier tune runs on the same data (another grid) stay in tune.json, so that
    # one-factor-at-a-time grids add up to one ablation table; a trial run again replaces its entry.
    same = {"data": stage_fingerprints(cfg)["datasets"], "overrides": sorted(overrides)}
    trials += earlier_trials(read_json(top / "tune.json") or {}, same, sorted(baselines), trials)
    ranked = sorted(trials, key=lambda t: -t["validation_accuracy"])  # stable: grid order breaks ties
    out = {"split": "validation", "items": cfg.benchmark.n_validation, **same, "grid": grid, "trials": ranked,
           "baselines": [entry for entry, _ in baselines.values()], **({"sft_curve": curve} if recipe else {}),
           "best": ranked[0]["set"], "note": "chosen on validation items carved from the train split; the eval split was not read"}
    write_json(out, top / "tune.json")
    return out
