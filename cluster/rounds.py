"""Running a run: `run_stages` (what `lossaverse run` and `lossaverse.run` call) and the rounds loop,
`rounds.count` rounds of the stages, each round's target playing the one the round before trained,
with rounds.json (each round's accuracies and its gain) at the top of the run directory. One round
is `lossaverse.cluster.runner.execute`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow.compute as pc

from lossaverse.cluster.config import RunConfig
from lossaverse.cluster.ray_env import init_ray, shutdown_ray
from lossaverse.cluster.runner import execute
from lossaverse.cluster.stages import StageError, stage_fingerprints
from lossaverse.pipeline.data.rundir import MANIFEST, Manifest, read_json, read_table, write_json
from lossaverse.pipeline.data.schemas import MARKED
from lossaverse.pipeline.report.evalstats import TRANSFER, compare, item_scores, models_of, pair_of
from lossaverse.pipeline.report.report import render_report


def round_summary(cfg: RunConfig) -> dict:
    """One entry of rounds.json for cfg's round: every evaluated model's accuracy and CI, each
    competitor's accuracy on the round's train items, and the round's `gain`: the trained target
    (`train.method`) against the untrained one in round 1, against the round before's trained
    target from round 2 on (paired on the same eval items)."""
    run_dir = cfg.run_dir
    results = read_json(run_dir / "eval" / "results.json")
    if results is None:
        raise StageError(f"{run_dir / 'eval' / 'results.json'} is missing: round {cfg.round} was not evaluated")
    entry: dict = {"round": cfg.round, **{name: {"accuracy": r["accuracy"], "ci95": r["ci95"], "items": r["items"]}
                                          for name, r in models_of(results).items()}}
    stats = read_json(run_dir / "datasets" / "stats.json") or {}
    for name, c in stats.get("competitors", {}).items():
        entry[f"competitor {name}"] = {"accuracy": c["accuracy"], "ci95": c["ci95_bootstrap_items"],
                                       "answers": c["answers"], "split": "train"}
    trained = f"target-{cfg.train.method}"
    if cfg.round == 1:
        pair = pair_of(results, trained, "target-base")
        entry["gain"] = {"vs": "target-base", **{k: pair[k] for k in ("items", "diff", "ci95", "mcnemar_p")}}
    else:
        def scores(d: Path) -> dict[str, float]:
            marked = read_table(d / "eval" / "marked", MARKED)
            return item_scores(marked.filter(pc.not_equal(marked["split"], TRANSFER)))[trained]

        now, then = scores(run_dir), scores(cfg.round_dir(cfg.round - 1))
        pair = compare(now, then, seed=cfg.seed)
        entry["gain"] = {"vs": f"round {cfg.round - 1}", **{k: pair[k] for k in ("items", "diff", "ci95", "mcnemar_p")}}
    entry["gain"]["significant"] = entry["gain"]["ci95"][0] > 0
    return entry


def execute_rounds(cfg: RunConfig, names: list[str], force: bool = False, report: Callable[[str], None] = print) -> Manifest:
    """`rounds.count` rounds of the named stages (one round: `execute`). After each evaluated round,
    rounds.json at the top of the run directory gets the round's entry (`round_summary`) and the
    report is re-rendered; with `rounds.stop_when_no_gain`, a round without a significant gain ends
    the loop. Completed rounds are skipped stage by stage, so an interrupted run continues where it
    stopped."""
    if cfg.rounds.count == 1:
        return execute(cfg, names, force, report)
    if not {"train", "evaluate"} <= set(names):
        raise StageError("rounds need every stage (each round plays the target the round before trained): "
                         "use `lossaverse run`, or pick one round's stage with --set round=K")
    summary: list[dict] = []
    manifest = None
    for k in range(1, cfg.rounds.count + 1):
        report(f"[bold]round {k}/{cfg.rounds.count}[/]")
        rcfg = cfg.at_round(k)
        manifest = execute(rcfg, names, force, report)
        entry = round_summary(rcfg)
        summary.append(entry)
        write_json(summary, cfg.top_dir / "rounds.json")
        g = entry["gain"]
        report(f"round {k}: target-{cfg.train.method} {entry[f'target-{cfg.train.method}']['accuracy']:.3f}, "
               f"gain vs {g['vs']} {g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]")
        if cfg.rounds.stop_when_no_gain and not g["significant"] and k < cfg.rounds.count:
            report(f"stop after round {k}: no gain beyond the 95% CI (stop_when_no_gain)")
            break
    render_report(cfg.top_dir)
    return manifest


def is_multi_round(cfg: RunConfig, names: list[str]) -> bool:
    """Whether `names` run as the rounds loop (every round) rather than one round's stages."""
    return cfg.rounds.count > 1 and cfg.round == 1 and set(names) >= {"train", "evaluate"}


def complete(cfg: RunConfig, names: list[str]) -> bool:
    """Whether every named stage (of every round, for the rounds loop) is already recorded with its
    current fingerprint: a run that would only skip. Reads the manifests, takes no lock."""
    rounds = range(1, cfg.rounds.count + 1) if is_multi_round(cfg, names) else [cfg.round]
    for k in rounds:
        rcfg = cfg.at_round(k)
        fps = stage_fingerprints(rcfg)
        done = (read_json(rcfg.run_dir / MANIFEST) or {}).get("stages", {})
        if any((done.get(n) or {}).get("fingerprint") != fps[n] for n in names):
            return False
    return True


def run_stages(cfg: RunConfig, names: list[str], force: bool = False, report: Callable[[str], None] = print,
               address: str | None = None) -> Manifest:
    """Run the named stages (all rounds of them, for the rounds loop) on Ray. A Ray this process
    already started is used and left running; otherwise `address` (or RAY_ADDRESS) is connected
    to, or an embedded local Ray is started, and shut down at the end. A run whose every stage is
    already complete (a rerun) starts no Ray at all: it only reports the skips."""
    import ray  # deferred: Ray loads in seconds


    needs_ray = force or not complete(cfg, names)
    ours = needs_ray and not ray.is_initialized()
    if needs_ray:
        report(init_ray(cfg.ray, address, output_dir=cfg.top_dir))
    else:
        report("every stage is complete: Ray not started")
    try:
        return execute_rounds(cfg, names, force, report) if is_multi_round(cfg, names) else execute(cfg, names, force, report)
    finally:
        if ours:
            shutdown_ray()
