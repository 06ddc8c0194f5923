"""The run report: runs/<name>/report.md and its plots in runs/<name>/report/*.png.

Rendered from the run directory's stored files alone, so `lossaverse report RUN_DIR` re-renders it
at any time, anywhere the directory is readable:

    manifest.json               config (seed, target, train method)
    eval/results.json           per-model accuracy, CI, pairs; an optional `rounds` list
    eval/transfer/results.json  the same on a second benchmark (evaluate.transfer), if any
    rounds.json                 per-round entries of a multi-round run; the other sources are then
                                read from the last round's directory (rounds/<k>/)
    datasets/stats.json         competitors' accuracy, label balance, recommended KTO weights
    datasets/kto/, marked/      label balance and reasons for wrong answers per competitor
    checkpoints/metrics.json    training log: a list of per-step dicts (loss, kl, rewards/chosen, ...)
    tune.json                   `lossaverse tune`'s trials: the ablation table and the loss-aversion sweep

Every source is optional; a section or plot whose source is absent is left out. `rounds`, when
present, is a list of {"round": k, <name>: {"accuracy": a, "ci95": [lo, hi]}, ...}.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as pads

from lossaverse.pipeline.data.rundir import read_json
from lossaverse.pipeline.report import lossaversion
from lossaverse.pipeline.report.evalstats import TRANSFER, model_label, model_table, models_of, wrong_answers_pair
from lossaverse.pipeline.report.plots import plot_accuracy, plot_competitors, plot_rounds, plot_training, round_entries

RIGHT_REASONS = ("match", "llm_equal")  # reasons a right answer carries; every other reason is a wrong one
# Training-log keys per panel, with the reader's name of each line. KTO logs the desirable
# examples' rewards as rewards/chosen and the undesirable ones' as rewards/rejected (as DPO does).
CURVES = {
    "loss": {"loss": "train loss", "eval_loss": "validation loss"},
    "KL estimate": {"kl": "KL (reference point)"},
    "rewards": {"rewards/chosen": "desirable (rewards/chosen)", "rewards/rejected": "undesirable (rewards/rejected)",
                "rewards/margins": "margin"},
    "learning rate": {"learning_rate": "learning rate"},
}


class ReportError(FileNotFoundError):
    """A run directory with nothing to report; the message says what to run first."""


@dataclass
class RunFiles:
    """What a run directory holds, loaded once."""

    run_dir: Path
    manifest: dict = field(default_factory=dict)
    stats: dict | None = None
    results: dict | None = None
    metrics: list[dict] = field(default_factory=list)
    source: Path | None = None  # where the round-level files are read (the last round's directory)
    transfer: dict | None = None  # eval/transfer/results.json
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # competitor -> desirable/undesirable
    wrong_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # competitor -> reason -> count


def _columns(path: Path, columns: list[str]):
    """Only `columns` of the Parquet under `path`, or None when there is none."""
    if not path.is_dir():
        return None
    files = sorted(str(p) for p in path.glob("*.parquet"))
    if not files:
        return None
    ds = pads.dataset(files, format="parquet")
    return ds.to_table(columns=[c for c in columns if c in ds.schema.names])


def _competitor_counts(files: RunFiles) -> None:
    """Label balance from datasets/kto (else marked/, else stats.json); wrong reasons from marked/ (else stats.json)."""
    kto = _columns(files.source / "datasets" / "kto", ["competitor", "label"])
    marked = _columns(files.source / "marked", ["competitor", "correct", "reason"])
    comps = (files.stats or {}).get("competitors", {})
    if kto is not None:
        for name, label in zip(kto["competitor"].to_pylist(), kto["label"].to_pylist()):
            c = files.labels.setdefault(name, {"desirable": 0, "undesirable": 0})
            c["desirable" if label else "undesirable"] += 1
    elif marked is not None:
        for name, ok in zip(marked["competitor"].to_pylist(), marked["correct"].to_pylist()):
            c = files.labels.setdefault(name, {"desirable": 0, "undesirable": 0})
            c["desirable" if ok else "undesirable"] += 1
    else:
        for name, c in comps.items():
            files.labels[name] = {"desirable": c["correct"], "undesirable": c["answers"] - c["correct"]}
    if marked is not None:
        for name, ok, reason in zip(marked["competitor"].to_pylist(), marked["correct"].to_pylist(), marked["reason"].to_pylist()):
            if not ok:
                r = files.wrong_reasons.setdefault(name, {})
                r[reason] = r.get(reason, 0) + 1
    else:
        for name, c in comps.items():
            files.wrong_reasons[name] = {r: n for r, n in c.get("reasons", {}).items() if r not in RIGHT_REASONS and n}


def load_run(run_dir: Path) -> RunFiles:
    """Read every report source under `run_dir`; ReportError when there is none at all."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}")
    manifest = read_json(run_dir / "manifest.json", {})
    rounds = read_json(run_dir / "rounds.json") or []
    last = max((int(r.get("round", 1)) for r in rounds if isinstance(r, dict)), default=1)
    source = run_dir if last == 1 else run_dir / "rounds" / str(last)
    files = RunFiles(run_dir, manifest, read_json(source / "datasets" / "stats.json"), read_json(source / "eval" / "results.json"),
                     read_json(source / "checkpoints" / "metrics.json") or [], source,
                     read_json(source / "eval" / TRANSFER / "results.json"))
    if rounds and files.results is not None:
        files.results = {**files.results, "rounds": rounds}
    _competitor_counts(files)
    if not (files.stats or files.results or files.metrics or files.labels):
        raise ReportError(f"{run_dir} holds no datasets/stats.json, eval/results.json, marked/ or checkpoints/metrics.json: "
                          "run `lossaverse run CONFIG` (or its stages) first")
    return files


def render_report(run_dir: Path) -> dict:
    """Write run_dir/report.md and run_dir/report/*.png; returns their paths.

    The plots are rendered into report.tmp/ and renamed into place, so a stale plot from an earlier
    render never sits beside a fresh report.
    """
    files = load_run(run_dir)
    run_dir = Path(run_dir)
    tmp, final = run_dir / "report.tmp", run_dir / "report"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    made: dict[str, str] = {}
    models = models_of(files.results or {})
    if models:
        made["accuracy"] = plot_accuracy(models, (files.results or {}).get("pairs", []), tmp / "accuracy.png")
    rounds = (files.results or {}).get("rounds") or []
    if rounds:
        made["rounds"] = plot_rounds(rounds, tmp / "rounds.png")
    if files.labels or files.wrong_reasons:
        made["competitors"] = plot_competitors(files.labels, files.wrong_reasons, tmp / "competitors.png")
    if any(k in m for m in files.metrics for panel in CURVES.values() for k in panel):
        made["training"] = plot_training(files.metrics, CURVES, tmp / "training.png")
    settings = lossaversion.kto_settings(files)
    if settings is not None and files.metrics:
        made["value_function"] = lossaversion.plot_value_function(*settings, files.metrics, tmp / "value_function.png")
    tune = read_json(run_dir / "tune.json")
    if tune and (sweep := lossaversion.plot_sweep(tune, tmp / "loss_aversion.png")):
        made["loss_aversion"] = sweep
    if tune and (curve := lossaversion.plot_sft_curve(tune, tmp / "sft_curve.png")):
        made["sft_curve"] = curve
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    text = markdown(files, {k: f"report/{Path(v).name}" for k, v in made.items()}, tune)
    report = run_dir / "report.md"
    part = run_dir / f"report.md.tmp-{os.getpid()}"
    part.write_text(text)
    os.replace(part, report)
    return {"report": str(report), "plots": [str(final / Path(v).name) for v in made.values()]}


# ---- markdown ----------------------------------------------------------------------------------

def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _ci(ci) -> str:
    return f"[{_pct(ci[0])}, {_pct(ci[1])}]" if ci else "n/a"


def _verdict(pair: dict, alpha: float = 0.05) -> str:
    """Better or worse only when the bootstrap CI and McNemar's exact test agree: with a handful of
    discordant items the percentile interval can exclude zero while the exact test cannot."""
    lo, hi = pair["ci95"]
    if (lo > 0 or hi < 0) and pair["mcnemar_p"] >= alpha:
        return f"not shown: CI excludes zero but McNemar p ≥ {alpha} (few discordant items)"
    if lo > 0:
        return "better (CI above zero)"
    if hi < 0:
        return "worse (CI below zero)"
    return "no difference shown (CI includes zero)"


def model_table_md(results: dict) -> list[str]:
    """The one-row-per-model table (evalstats.model_table, the console summary's own) in Markdown."""
    header, rows = model_table(results)
    out = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out + ["", "Δ: paired difference in points [95% CI]; ▲/▼ better/worse (the CI and McNemar's p < 0.05 agree), "
                      "= no difference shown."]


def _headline(results: dict) -> list[str]:
    models = models_of(results)
    lines = ["## Headline", "", "| model | accuracy | 95% CI | items | answers |", "|---|---:|---:|---:|---:|"]
    for name, r in models.items():
        lines.append(f"| {model_label(name)} (`{name}`) | {_pct(r['accuracy'])} | {_ci(r.get('ci95'))} | "
                     f"{r.get('items', 'n/a')} | {r.get('answers', '')} |")
    pairs = results.get("pairs") or []
    if (w := wrong_answers_pair(results)) is not None:
        lo, hi = w["ci95"]
        lines += ["", f"**What the wrong answers added** (the recipe − RFT: the same SFT start, on-policy answers "
                      f"and steps, RFT on the right answers alone; paired on {w['items']} items): "
                      f"{_pts(w['diff'])} points [{_pts(lo)}, {_pts(hi)}], McNemar p {_p(w['mcnemar_p'])}: {_verdict(w)}."]
    if pairs:
        lines += ["", "| comparison (same items) | difference (points) | 95% CI (points) | McNemar p | better / worse / tied items | verdict |",
                  "|---|---:|---:|---:|---:|---|"]
        for p in pairs:
            lo, hi = p["ci95"]
            lines.append(f"| {model_label(p['model'])} − {model_label(p['baseline'])} | {_pts(p['diff'])} | "
                         f"[{_pts(lo)}, {_pts(hi)}] | {_p(p['mcnemar_p'])} | "
                         f"{p['model_better']} / {p['baseline_better']} / {p['ties']} | {_verdict(p)} |")
    st = results.get("statistics")
    if st:
        lines += ["", f"CI: {st['ci']}, {st['n_boot']} resamples, seed {st['seed']}. Paired test: {st['test']}."]
    return lines


def _transfer(results: dict) -> list[str]:
    """The headline tables again, on the second benchmark (never trained on)."""
    lines = _headline({k: v for k, v in results.items() if k != "statistics"})
    lines[0] = "## Transfer: a benchmark the target was not trained on"
    return lines


def _rounds(rounds: list[dict]) -> list[str]:
    rows = round_entries(rounds)
    names = sorted({n for _, entries in rows for n in entries})
    gains = {int(r.get("round", i + 1)): r["gain"] for i, r in enumerate(rounds) if isinstance(r, dict) and isinstance(r.get("gain"), dict)}
    lines = ["## Rounds", "",
             "Target accuracy on the eval items and each competitor's on the round's fresh train items. From round 2 "
             "on the previous round's trained target plays as a competitor; the gain compares the round's trained "
             "target with the untrained one (round 1) or with the round before's (paired, same items).", "",
             "| round | " + " | ".join(model_label(n) for n in names) + (" | gain (95% CI), McNemar p |" if gains else " |"),
             "|---:|" + "---:|" * (len(names) + bool(gains))]
    for k, entries in rows:
        cells = [f"{_pct(entries[n]['accuracy'])} {_ci(entries[n]['ci95']) if entries[n].get('ci95') else ''}".strip()
                 if n in entries else "" for n in names]
        if gains:
            g = gains.get(k)
            cells.append(f"{_pts(g['diff'])} [{_pts(g['ci95'][0])}, {_pts(g['ci95'][1])}] vs {g.get('vs', '')}, p {_p(g['mcnemar_p'])}" if g else "")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines


def _competitors(files: RunFiles) -> list[str]:
    lines = ["## Competitors and training data", ""]
    comps = (files.stats or {}).get("competitors", {})
    if comps:
        lines += ["| competitor | accuracy (train split) | 95% CI (items) | answers |", "|---|---:|---:|---:|"]
        for name, c in comps.items():
            lines.append(f"| {name} | {_pct(c['accuracy'])} | {_ci(c.get('ci95_bootstrap_items'))} | {c['answers']} |")
        agreement = (files.stats or {}).get("agreement") or {}
        if "mcnemar_p" in agreement:
            lines += ["", "Agreement: " + ", ".join(f"{k} {v}" for k, v in agreement.items() if isinstance(v, int))
                      + f"; McNemar p {_p(agreement['mcnemar_p'])}."]
        lines.append("")
    if files.labels:
        lines += ["| competitor | desirable | undesirable | desirable share | wrong answers by reason |", "|---|---:|---:|---:|---|"]
        for name, c in files.labels.items():
            total = c["desirable"] + c["undesirable"]
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(files.wrong_reasons.get(name, {}).items(), key=lambda x: -x[1]))
            lines.append(f"| {name} | {c['desirable']} | {c['undesirable']} | {_pct(c['desirable'] / total) if total else 'n/a'} | {reasons or '—'} |")
    weights = (files.stats or {}).get("recommended_kto_weights")
    if weights:
        lines += ["", f"Recommended KTO weights (desirable : undesirable = {weights['desirable_weight']} : "
                      f"{weights['undesirable_weight']}) bring λ_D·n_D / λ_U·n_U into the KTO paper's range [1, 4/3]."]
    return lines


def _training(files: RunFiles) -> list[str]:
    steps = [m for m in files.metrics if "loss" in m]
    lines = ["## Training", ""]
    train = files.manifest.get("config", {}).get("train", {})
    if train:
        lines.append("Training: " + ", ".join(f"{k} {train[k]}" for k in ("method", "beta", "learning_rate", "epochs") if k in train) + ".")
    if steps:
        first, last = steps[0], steps[-1]
        lines.append(f"{len(steps)} logged steps; loss {first['loss']:.4f} → {last['loss']:.4f}"
                     + (f"; KL {last['kl']:.4f} at the end" if isinstance(last.get("kl"), (int, float)) else "") + ".")
    stage = (read_json((files.source or files.run_dir) / "manifest.json", {}) or {}).get("stages", {}).get("train", {})
    if stage.get("compare"):
        recipe = stage.get("recipe")
        sft_steps = train.get("sft_steps", (recipe or {}).get("sft", {}).get("steps"))
        shared = (" The SFT baseline is one SFT run: its model after step "
                  f"{sft_steps} is the recipe's SFT start, so KTO, RFT and SFT continue from one checkpoint." if (recipe or {}).get("sft_shared") else "")
        heading = (f"The recipe (SFT {sft_steps} steps, then KTO {stage.get('steps')} steps on its own "
                   f"datasets) and the methods compared with it at the same budget ({stage.get('budget_steps')} steps).{shared}"
                   if recipe else f"Methods compared on the same data with the same budget ({stage.get('budget_steps')} steps):")
        lines += ["", heading, "",
                  "| method | training rows | steps | final train loss |", "|---|---:|---:|---:|"]
        for method, r in {train.get("method", "kto"): stage, **stage["compare"]}.items():
            loss = r.get("train_loss")
            lines.append(f"| {method} | {r.get('rows', 'n/a')} | {r.get('steps', 'n/a')} | {f'{loss:.4f}' if isinstance(loss, (int, float)) else 'n/a'} |")
    return lines


def markdown(files: RunFiles, plots: dict[str, str], tune: dict | None = None) -> str:
    """The report text; `plots` maps a plot's name to its path relative to the run directory;
    `tune` is the run's tune.json, if any (the ablation table and the loss-aversion sweep)."""
    cfg = files.manifest.get("config", {})
    lines = [f"# lossaverse report: {cfg.get('name') or files.run_dir.name}", ""]
    target = (cfg.get("target") or {}).get("path")
    facts = [f"run directory `{files.run_dir}`"] + ([f"target `{target}`"] if target else []) + \
            ([f"seed {cfg['seed']}"] if "seed" in cfg else [])
    lines += [", ".join(facts) + ".", ""]
    if files.results and models_of(files.results):
        lines += model_table_md(files.results) + [""] + _headline(files.results) + [""]
        if "accuracy" in plots:
            lines += [f"![eval accuracy per model]({plots['accuracy']})", ""]
    else:
        lines += ["No evaluation yet: run `lossaverse evaluate CONFIG`.", ""]
    if files.transfer and models_of(files.transfer):
        lines += _transfer(files.transfer) + [""]
    if files.results and files.results.get("rounds"):
        lines += _rounds(files.results["rounds"]) + [""]
        if "rounds" in plots:
            lines += [f"![accuracy per round]({plots['rounds']})", ""]
    if files.stats or files.labels:
        lines += _competitors(files) + [""]
        if "competitors" in plots:
            lines += [f"![label balance and reasons for wrong answers]({plots['competitors']})", ""]
    if files.metrics:
        lines += _training(files) + [""]
        if "training" in plots:
            lines += [f"![training curves]({plots['training']})", ""]
    lines += lossaversion.section(files, plots, tune)
    return "\n".join(lines).rstrip() + "\n"
