"""The console summary of a run, read back from its run directory: one row per evaluated model
(`lossaverse.pipeline.report.evalstats.model_table`, the table that also heads report.md), what the wrong
answers added, one line on the competitors and datasets, rounds, and where the report and the logs
are. The report (`lossaverse.pipeline.report.report`) holds the rest."""

from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

LEGEND = "Δ: paired difference in points [95% CI]; ▲/▼ better/worse (CI and McNemar p < 0.05 agree), = not shown"


def model_rich_table(results: dict, title: str) -> Table:
    from lossaverse.pipeline.report.evalstats import model_table  # deferred: keeps `lossaverse --help` light

    header, rows = model_table(results)
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def summary_lines(run_dir: Path) -> list[str]:
    """The lines under the table: what the wrong answers added, competitors and datasets, rounds,
    and the paths of the report and the logs."""
    from lossaverse.pipeline.data.rundir import read_json  # deferred: keeps `lossaverse --help` light
    from lossaverse.pipeline.report.evalstats import wrong_answers_pair  # deferred: keeps `lossaverse --help` light

    lines = []
    top = run_dir
    rounds = read_json(top / "rounds.json") or []
    last = max((r["round"] for r in rounds), default=1)
    run_dir = top if last == 1 else top / "rounds" / str(last)
    results = read_json(run_dir / "eval" / "results.json") or {}
    if (p := wrong_answers_pair(results)) is not None:
        lo, hi = p["ci95"]
        lines.append(f"wrong answers added (recipe − RFT, {p['items']} items): {100 * p['diff']:+.1f} points "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar p {p['mcnemar_p']:.3g}")
    stats_path = run_dir / "datasets" / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        comps = ", ".join(f"{name} {100 * c['accuracy']:.1f}% ({c['correct']}/{c['answers']})"
                          for name, c in stats["competitors"].items())
        labels = stats["labels"]
        manifest = read_json(run_dir / "manifest.json") or {}
        ds = manifest.get("stages", {}).get("datasets", {})
        extra = "".join(f", {name} {ds[name]}" for name in ("negatives", "pairs") if name in ds)
        lines.append(f"competitors: {comps}")
        lines.append(f"datasets: kto {labels['total']} rows ({labels['desirable']} right / {labels['undesirable']} wrong){extra}")
    for r in rounds:
        g = r["gain"]
        lines.append(f"round {r['round']}: gain vs {g['vs']} {100 * g['diff']:+.1f} points "
                     f"[{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}], McNemar p {g['mcnemar_p']:.3g}")
    if rounds:
        lines.append(f"rounds: {top / 'rounds.json'}")
    if (top / "report.md").is_file():
        lines.append(f"report: {top / 'report.md'}")
    if (top / "logs").is_dir():
        lines.append(f"logs: {top / 'logs'}")
    return lines


def summary_table(run_dir: Path) -> Group:
    """The headline of a run (a multi-round run: its last round's): the model table, the transfer
    benchmark's where there is one, then `summary_lines`."""
    from lossaverse.pipeline.data.rundir import read_json  # deferred: keeps `lossaverse --help` light

    rounds = read_json(run_dir / "rounds.json") or []
    last = max((r["round"] for r in rounds), default=1)
    here = run_dir if last == 1 else run_dir / "rounds" / str(last)
    parts = []
    results = read_json(here / "eval" / "results.json")
    if results:
        split = results.get("split") or "eval"
        parts.append(model_rich_table(results, f"lossaverse run {run_dir} ({split} items)"))
    transfer = read_json(here / "eval" / "transfer" / "results.json")
    if transfer:
        manifest = read_json(here / "manifest.json") or {}
        bench = (manifest.get("config", {}).get("evaluate", {}).get("transfer") or {}).get("name", "transfer")
        parts.append(model_rich_table(transfer, f"transfer: {bench} (never trained on)"))
    if parts:
        parts.append(Text(LEGEND, style="dim"))
    parts += [Text(line) for line in summary_lines(run_dir)]
    return Group(*parts)


def tune_table(out: dict) -> Table:
    """`lossaverse tune`'s trials, one row each in the summary's shape (points, paired Δ with its
    95% CI and mark), against the untrained target and each baseline: fits 100 columns."""
    from lossaverse.pipeline.report.evalstats import (  # deferred: keeps `lossaverse --help` light
        accuracy_cell,
        delta_cell,
    )

    vs = [b["method"] for b in out["baselines"]]
    table = Table(title=f"lossaverse tune: {out['items']} validation items (eval split not read)", box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True, title_justify="left")
    # A long trial name (a grid of several settings) folds onto a second line: the figures keep
    # their width, where rich would otherwise cut them short to fit.
    table.add_column("trial", justify="left", overflow="fold")
    for name in ["accuracy [95% CI]", "Δ untrained", *[f"Δ {m}" for m in vs]]:
        table.add_column(name, justify="right", no_wrap=True)
    for t in out["baselines"] + out["trials"]:
        gain = {"diff": t["gain"], "ci95": t["gain_ci95"], "mcnemar_p": t["mcnemar_p"]}
        table.add_row(t["trial"], accuracy_cell(t["validation_accuracy"], t["ci95"]), delta_cell(gain),
                      *[delta_cell((t.get("vs") or {}).get(m)) for m in vs])
    return table
