"""The console summary of a run: the headline numbers read back from its run directory
(competitors, datasets, each model's accuracy and its paired difference from the untrained target,
rounds). The report (`lossaverse.pipeline.report`) holds the rest."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table


def summary_table(run_dir: Path) -> Table:
    """The headline numbers of a run, read back from its run directory (a multi-round run: its
    last round's, then one row per round)."""
    from lossaverse.pipeline.rundir import read_json

    table = Table(title=f"lossaverse run: {run_dir}")
    table.add_column("what")
    table.add_column("value", justify="right")
    rounds = read_json(run_dir / "rounds.json") or []
    last = max((r["round"] for r in rounds), default=1)
    top, run_dir = run_dir, (run_dir if last == 1 else run_dir / "rounds" / str(last))
    stats_path = run_dir / "datasets" / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text())
        for name, c in stats["competitors"].items():
            table.add_row(f"competitor {name} accuracy", f"{c['accuracy']:.3f} ({c['correct']}/{c['answers']})")
        labels = stats["labels"]
        table.add_row("datasets/kto rows (desirable / undesirable)", f"{labels['total']} ({labels['desirable']} / {labels['undesirable']})")
    manifest = json.loads((run_dir / "manifest.json").read_text()) if (run_dir / "manifest.json").is_file() else {}
    ds = manifest.get("stages", {}).get("datasets", {})
    for name in ("negatives", "pairs"):
        if name in ds:
            table.add_row(f"datasets/{name} rows", str(ds[name]))
    results = read_json(run_dir / "eval" / "results.json")
    split = (results or {}).get("split") or "eval"
    for what, value in eval_rows(results or {}, split):
        table.add_row(what, value)
    transfer = read_json(run_dir / "eval" / "transfer" / "results.json")
    if transfer:
        bench = (manifest.get("config", {}).get("evaluate", {}).get("transfer") or {}).get("name", "transfer")
        for what, value in eval_rows(transfer, f"transfer: {bench}"):
            table.add_row(what, value)
    for r in rounds:
        g = r["gain"]
        table.add_row(f"round {r['round']}: gain vs {g['vs']}",
                      f"{g['diff']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] McNemar p={g['mcnemar_p']:.3g}")
    if rounds:
        table.add_row("rounds summary", str(top / "rounds.json"))
    return table


def eval_rows(results: dict, split: str = "eval") -> list[tuple[str, str]]:
    """eval/results.json as summary rows: accuracy [95% CI] per model, then each model's paired
    difference from the untrained target [95% CI] with McNemar's p (the other pairs are in the
    report); `split` names where the items came from."""
    from lossaverse.pipeline.evalstats import model_label, models_of, wrong_answers_pair

    rows = []
    for name, r in models_of(results).items():
        ci = f" [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" if r.get("ci95") else ""
        answers = r.get("answers", r.get("n"))
        items = f", {r['items']} items" if r.get("items", answers) != answers else ""
        rows.append((f"{model_label(name)} accuracy ({split})", f"{r['accuracy']:.3f}{ci} ({r['correct']}/{answers}{items})"))
    for p in results.get("pairs") or []:
        if not p["baseline"].endswith("-base"):
            continue
        lo, hi = p["ci95"]
        rows.append((f"{p['model']} − {p['baseline']} ({split}, paired)",
                     f"{p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] McNemar p={p['mcnemar_p']:.3g}"))
    if (p := wrong_answers_pair(results)) is not None:
        lo, hi = p["ci95"]
        rows.append((f"wrong answers added: {p['model']} − {p['baseline']} ({split}, paired)",
                     f"{p['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] McNemar p={p['mcnemar_p']:.3g}"))
    return rows
