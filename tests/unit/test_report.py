"""The report renders from a run directory's stored Parquet and JSON alone.

The run directory is small but real: Parquet written through lossaverse.pipeline.data.rundir.write_table under the
row contracts, stats.json and kto/ built by lossaverse.pipeline.data.build, results.json by lossaverse.pipeline.report.evalstats.
The expected numbers are worked out by hand below.
"""

import json
import shutil

import matplotlib.image
import pyarrow as pa
import pytest
from rich.console import Console
from typer.testing import CliRunner

from lossaverse.cluster.cli import app
from lossaverse.cluster.summary import summary_table
from lossaverse.pipeline.data.build import build_datasets
from lossaverse.pipeline.data.rundir import write_json, write_table
from lossaverse.pipeline.data.schemas import ITEMS, MARKED, check
from lossaverse.pipeline.report.evalstats import evaluation_results
from lossaverse.pipeline.report.report import ReportError, load_run, render_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def rows(competitor: str, split: str, verdicts: list[bool], wrong_reason: str = "mismatch") -> list[dict]:
    out = []
    for i, ok in enumerate(verdicts):
        out.append({"id": f"{split}-{i:03d}", "question": f"What is {i} + 1?", "reference": str(i + 1), "kind": "numeric",
                    "choices": None, "split": split, "source": "builtin", "competitor": competitor,
                    "model": f"/models/{competitor}", "sample": 0, "prompt": f"Q: What is {i} + 1?\nA:",
                    "completion": f" The answer is {i + 1 if ok else 0}.", "finish_reason": "stop", "completion_tokens": 6,
                    "error": None, "correct": ok, "extracted": str(i + 1 if ok else 0),
                    "reason": "match" if ok else wrong_reason, "marked_by": "rules"})
    return out


def build_run(run_dir, rounds: bool = True):
    """Train split: large right on 12 of 16, small on 4 of 16 (small's misses: 10 mismatch, 2 truncated).
    Eval split (20 items): base right on e000-e003 and e019 (25.0%), kto on e000-e008 (45.0%):
    diff +20.0 points, discordant b=5, c=1, McNemar p = 2 * 7/64 = 0.21875."""
    small = rows("small", "train", [i < 4 for i in range(16)])
    for r in small[-2:]:
        r["reason"], r["finish_reason"] = "truncated", "length"
    train = pa.Table.from_pylist(rows("large", "train", [i < 12 for i in range(16)]) + small, schema=MARKED)
    evaluated = pa.Table.from_pylist(rows("target-base", "eval", [i < 4 or i == 19 for i in range(20)])
                                     + rows("target-kto", "eval", [i < 9 for i in range(20)]), schema=MARKED)
    items = check(pa.concat_tables([train.filter(pa.compute.equal(train["competitor"], "large")), evaluated.slice(0, 20)]), ITEMS, "items")
    write_table(items, run_dir / "items")
    write_table(train, run_dir / "marked")
    built = build_datasets(train)
    write_table(built["kto"], run_dir / "datasets" / "kto")
    write_json(built["stats"], run_dir / "datasets" / "stats.json")
    write_table(evaluated, run_dir / "eval" / "marked")
    results = evaluation_results(evaluated, ["target-base", "target-kto"], seed=5)
    if rounds:
        results["rounds"] = [{"round": 1, "target-kto": {"accuracy": 0.45, "ci95": [0.25, 0.65]}, "small": {"accuracy": 0.25}},
                             {"round": 2, "target-kto": {"accuracy": 0.55, "ci95": [0.35, 0.75]}, "small": {"accuracy": 0.45}}]
    write_json(results, run_dir / "eval" / "results.json")
    metrics = [{"step": s, "loss": 0.5 - 0.002 * s, "kl": 0.01 * (s % 7), "rewards/chosen": 0.003 * s,
                "rewards/rejected": -0.004 * s, "learning_rate": 5e-5 * (1 - s / 40)} for s in range(1, 41)]
    write_json(metrics + [{"train_loss": 0.46, "train_runtime": 12.0}], run_dir / "checkpoints" / "metrics.json")
    write_json({"config": {"name": "tiny", "seed": 5, "target": {"path": "tiny:small"},
                           "train": {"method": "kto", "beta": 0.1}}, "stages": {}}, run_dir / "manifest.json")
    return run_dir


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run_dir = build_run(tmp_path_factory.mktemp("run") / "tiny")
    return run_dir, render_report(run_dir)


def test_report_states_the_headline_numbers(rendered):
    run_dir, out = rendered
    text = (run_dir / "report.md").read_text()
    assert out["report"] == str(run_dir / "report.md")
    assert "| target before training (`target-base`) | 25.0% |" in text
    assert "| target after KTO (`target-kto`) | 45.0% |" in text
    assert "| 20 | 20 |" in text  # items, answers
    assert "| target after KTO − target before training | +20.0 |" in text
    assert "| 0.219 |" in text  # McNemar p = 0.21875
    assert "5 / 1 / 14" in text  # better / worse / tied items
    assert "| large | 75.0% |" in text and "| small | 25.0% |" in text  # train split: 12/16, 4/16
    assert "| small | 4 | 12 | 25.0% | mismatch 10, truncated 2 |" in text
    assert "40 logged steps; loss 0.4980 → 0.4200" in text
    assert "| 2 | " in text and "55.0% [35.0%, 65.0%]" not in text and "55.0% [35.0%, 75.0%]" in text


def test_report_ci_matches_the_stored_results(rendered):
    run_dir, _ = rendered
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    lo, hi = results["target-kto"]["ci95"]
    assert f"| 45.0% | [{100 * lo:.1f}%, {100 * hi:.1f}%] |" in (run_dir / "report.md").read_text()


def test_plots_are_valid_nonempty_pngs(rendered):
    run_dir, out = rendered
    names = sorted(p.name for p in (run_dir / "report").iterdir())
    assert names == ["accuracy.png", "competitors.png", "rounds.png", "training.png"]
    assert sorted(out["plots"]) == sorted(str(run_dir / "report" / n) for n in names)
    text = (run_dir / "report.md").read_text()
    for name in names:
        path = run_dir / "report" / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC
        assert f"(report/{name})" in text
    image = matplotlib.image.imread(run_dir / "report" / "accuracy.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image.std() > 0.01  # something was drawn


def test_rerender_gives_the_same_report_and_drops_stale_plots(rendered, tmp_path):
    run_dir, _ = rendered
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "report" / "stale.png").write_bytes(b"old")
    render_report(copy)
    assert (copy / "report.md").read_text().replace(str(copy), "X") == (run_dir / "report.md").read_text().replace(str(run_dir), "X")
    assert not (copy / "report" / "stale.png").exists()


def test_a_run_without_rounds_has_no_rounds_section(tmp_path):
    run_dir = build_run(tmp_path / "one", rounds=False)
    assert load_run(run_dir).results["pairs"][0]["model"] == "target-kto"
    render_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "| +20.0 |" in text and "| 0.219 |" in text and "## Rounds" not in text
    assert not (run_dir / "report" / "rounds.png").exists()


def test_partial_runs_render_what_exists(tmp_path):
    run_dir = build_run(tmp_path / "partial", rounds=False)
    shutil.rmtree(run_dir / "eval")
    write_json([{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}, {"epoch": 1.0}], run_dir / "checkpoints" / "metrics.json")
    out = render_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "No evaluation yet" in text and "2 logged steps; loss 0.7000 → 0.6000" in text
    assert sorted(p.rsplit("/", 1)[1] for p in out["plots"]) == ["competitors.png", "training.png"]
    with pytest.raises(ReportError, match="run `lossaverse run CONFIG`"):
        render_report(tmp_path / "partial" / "items")  # a directory with none of the report's sources


def test_cli_report_and_summary_show_ci_and_paired_test(rendered, tmp_path):
    run_dir, _ = rendered
    result = CliRunner().invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert f"report: {run_dir / 'report.md'}" in result.output
    console = Console(record=True, width=100)
    console.print(summary_table(run_dir))
    table = console.export_text()
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    lo, hi = results["target-kto"]["ci95"]
    kto = next(line for line in table.splitlines() if line.startswith("kto "))
    assert f"45.0 [{100 * lo:.1f},{100 * hi:.1f}]" in kto and "+20.0 [" in kto  # accuracy [CI], Δ vs untrained
    assert f"report: {run_dir / 'report.md'}" in table
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "run directory not found" in missing.output


def test_the_summary_table_has_one_row_per_model_and_fits_100_columns():
    """4 models on 400 items, the default job's shape: base, sft, rft, kto. Each row holds accuracy
    [CI], items and its difference from each baseline evaluated before it, with a verdict mark."""
    from lossaverse.cluster.summary import model_rich_table
    from lossaverse.pipeline.report.evalstats import model_table
    from lossaverse.pipeline.report.report import model_table_md

    right = {"target-base": 150, "target-sft": 280, "target-rft": 270, "target-kto": 290}
    marked = pa.Table.from_pylist([r for name, k in right.items() for r in rows(name, "eval", [i < k for i in range(400)])],
                                  schema=MARKED)
    results = evaluation_results(marked, list(right), seed=0)
    header, table_rows = model_table(results)
    assert header == ["model", "accuracy [95% CI]", "items", "Δ untrained", "Δ SFT", "Δ RFT"]
    assert [r[0] for r in table_rows] == ["base", "sft", "rft", "kto"]
    kto = dict(zip(header, table_rows[3]))
    assert kto["accuracy [95% CI]"].startswith("72.5 [") and kto["items"] == "400"
    # Nested right answers: kto is right wherever the others are, so every gain is one-sided.
    assert kto["Δ untrained"].startswith("+35.0 [") and kto["Δ untrained"].endswith("▲")
    assert kto["Δ SFT"].startswith("+2.5 [") and kto["Δ RFT"].startswith("+5.0 [")
    assert dict(zip(header, table_rows[2]))["Δ SFT"].startswith("-2.5 [")  # rft - sft
    assert table_rows[0][3:] == ["", "", ""] and table_rows[1][4:] == ["", ""]
    console = Console(record=True, width=100)
    console.print(model_rich_table(results, "lossaverse run runs/local (eval items)"))
    text = console.export_text().splitlines()
    assert max(len(line.rstrip()) for line in text) <= 100
    assert len(text) == 3 + 4  # title, header, rule, one unwrapped line per model
    md = model_table_md(results)
    assert md[0] == "| " + " | ".join(header) + " |" and md[5] == "| " + " | ".join(table_rows[3]) + " |"


def test_the_recipe_against_rft_is_headlined_as_what_the_wrong_answers_added(tmp_path):
    """20 items: RFT right on the first 9, the recipe on the first 12; 3 items the recipe alone
    gets right, none the other way: +15.0 points, McNemar exact p = 2 * 0.5^3 = 0.25."""
    from lossaverse.cluster.summary import summary_lines
    from lossaverse.pipeline.report.report import _headline

    marked = pa.Table.from_pylist(rows("target-base", "eval", [i < 4 for i in range(20)])
                                  + rows("target-rft", "eval", [i < 9 for i in range(20)])
                                  + rows("target-kto", "eval", [i < 12 for i in range(20)]), schema=MARKED)
    results = evaluation_results(marked, ["target-base", "target-rft", "target-kto"], seed=0)
    text = "\n".join(_headline(results))
    assert "**What the wrong answers added** (the recipe − RFT" in text and "paired on 20 items): +15.0 points" in text
    assert "McNemar p 0.250" in text
    run_dir = tmp_path / "r"
    write_json(results, run_dir / "eval" / "results.json")
    assert any(line.startswith("wrong answers added (recipe − RFT, 20 items): +15.0 points [")
               for line in summary_lines(run_dir))
    # No RFT evaluated: no such line.
    without = evaluation_results(marked.filter(pa.compute.not_equal(marked["competitor"], "target-rft")), seed=0)
    assert "wrong answers added" not in "\n".join(_headline(without))
    write_json(without, run_dir / "eval" / "results.json")
    assert not any("wrong answers added" in line for line in summary_lines(run_dir))


def test_the_tune_table_has_one_row_per_trial_and_fits_100_columns():
    import io

    from rich.console import Console

    from lossaverse.cluster.summary import tune_table

    def entry(name, acc, vs):
        return {"trial": name, "validation_accuracy": acc, "ci95": [acc - 0.065, acc + 0.065], "gain": acc - 0.395,
                "gain_ci95": [acc - 0.46, acc - 0.33], "mcnemar_p": 1e-14,
                "vs": {m: {"diff": d, "ci95": [d - 0.035, d + 0.035], "mcnemar_p": 0.01, "items": 200} for m, d in vs.items()}}

    out = {"items": 200, "baselines": [entry("baseline-sft", 0.67, {}) | {"method": "sft"}, entry("baseline-rft", 0.725, {}) | {"method": "rft"}],
           "trials": [entry("configured", 0.71, {"sft": 0.04, "rft": -0.015}), entry("desirable_weight-1.68", 0.675, {"sft": 0.005, "rft": -0.05})]}

    def render(out) -> str:
        text = io.StringIO()
        Console(file=text, width=100).print(tune_table(out))
        return text.getvalue()

    lines = render(out).splitlines()
    assert max(len(line) for line in lines) <= 100
    row = next(line for line in lines if line.startswith("desirable_weight-1.68"))
    assert "67.5 [61.0,74.0]" in row and "+28.0 [21.5,34.5]▲" in row and row.rstrip().endswith("-5.0 [-8.5,-1.5]▼")
    assert sum(line.startswith(("baseline-", "configured", "desirable")) for line in lines) == 4  # one line each

    # A grid of two settings names its trial past the column: the name folds, the figures stay whole.
    out["trials"].append(entry("beta-0.5_undesirable_weight-2.0", 0.70, {"sft": 0.05, "rft": 0.02}))
    text = render(out)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100 and "…" not in text
    row = next(line for line in lines if line.startswith("beta-0.5_"))
    assert "70.0 [63.5,76.5]" in row and "+30.5 [24.0,37.0]▲" in row and row.rstrip().endswith("+2.0 [-1.5,5.5]=")
    assert "".join(line.split()[0] for line in lines[lines.index(row):lines.index(row) + 2]) == "beta-0.5_undesirable_weight-2.0"
