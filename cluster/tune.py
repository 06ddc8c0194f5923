"""`lossaverse tune`: choose training settings on the validation items, never on the eval split.

The run's data stages (items, generate, mark, datasets) run once, as in `lossaverse run`; each
combination of the grid then trains the target and evaluates it on `benchmark.n_validation` items
carved from the train split, in a trial directory of its own (runs/<name>/tune/<trial>/, with the
run's items/ and datasets/ linked in, a manifest of its own, so a re-run skips finished trials).
tune.json ranks the trials by validation accuracy; the winner is printed as the `--set` line to
use for the real run, which then reports on the eval split.

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

from cluster.config import ConfigError, RunConfig, load_config
from pipeline.rundir import read_json, write_json


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


def tune(config: Path, overrides: list[str], grid: dict[str, list], report: Callable[[str], None] = print) -> dict:
    """Run every trial of `grid` (the caller has started Ray); write and return tune.json."""
    from cluster.stages import execute

    cfg = load_config(config, overrides)
    if cfg.benchmark.n_validation == 0:
        raise ConfigError("tune chooses settings on validation items: set benchmark.n_validation (for example --set benchmark.n_validation=400)")
    if cfg.rounds.count > 1:
        raise ConfigError("tune trains one round: tune with rounds: 1, then run the rounds with the chosen settings")
    execute(cfg, ["items", "generate", "mark", "datasets"], report=report)
    top = cfg.top_dir
    trials = []
    for values in itertools.product(*grid.values()):
        combo = dict(zip(grid, values))
        name = trial_name(combo)
        sets = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in combo.items()]
        tcfg: RunConfig = load_config(config, overrides + sets + [
            f"output_dir={top / 'tune'}", f"name={name}", "evaluate.split=validation", "evaluate.transfer=null", "train.compare=[]"])
        trial_dir = tcfg.run_dir
        trial_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("items", "datasets"):
            link = trial_dir / sub
            if not link.exists():
                link.symlink_to((top / sub).resolve(), target_is_directory=True)
        report(f"[bold]trial[/] {name}: " + " ".join(f"--set {s}" for s in sets))
        execute(tcfg, ["train", "evaluate"], report=report)
        results = read_json(trial_dir / "eval" / "results.json")
        trained = f"target-{tcfg.train.method}"
        pair = next(p for p in results["pairs"] if p["model"] == trained and p["baseline"] == "target-base")
        trials.append({"trial": name, "set": sets, "method": tcfg.train.method,
                       "validation_accuracy": results[trained]["accuracy"], "ci95": results[trained]["ci95"],
                       "items": results[trained]["items"], "base_accuracy": results["target-base"]["accuracy"],
                       "gain": pair["diff"], "gain_ci95": pair["ci95"], "mcnemar_p": pair["mcnemar_p"]})
    ranked = sorted(trials, key=lambda t: -t["validation_accuracy"])  # stable: grid order breaks ties
    out = {"split": "validation", "items": cfg.benchmark.n_validation, "grid": grid, "trials": ranked,
           "best": ranked[0]["set"], "note": "chosen on validation items carved from the train split; the eval split was not read"}
    write_json(out, top / "tune.json")
    return out
