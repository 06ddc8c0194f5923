"""End-to-end tier: the real `lossaverse run` (Ray, vLLM CPU, Ray Train + DeepSpeed + TRL KTO) on
tiny models, with a JSONL benchmark in GSM8K's own format that holds some malformed rows: the
session's whole loop (tests/e2e/conftest.py)."""

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS, KTO, MARKED, QUARANTINE
from lossaverse.pipeline.models.tinymodels import resolve_model
from lossaverse.pipeline.report.evalstats import models_of
from tests.conftest import ROOT, run_cli
from tests.e2e.conftest import BAD_ROWS, KTO_STEPS, N_EVAL, N_TRAIN, N_TRANSFER, N_VALIDATION, SAMPLES, SFT_STEPS

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run(whole_loop):
    return whole_loop


def test_every_row_is_accounted_for(run):
    d = run["dir"]
    items = read_table(d / "items", ITEMS)
    quarantine = read_table(d / "items" / "quarantine", QUARANTINE)
    assert items.num_rows + quarantine.num_rows == N_VALIDATION + N_TRAIN + BAD_ROWS + N_EVAL
    assert quarantine.num_rows == BAD_ROWS
    answers = read_table(d / "answers", ANSWERS)
    marked = read_table(d / "marked", MARKED)
    assert answers.num_rows == marked.num_rows == N_TRAIN * 2 * SAMPLES
    keys = {(r["id"], r["competitor"], r["sample"]) for r in marked.select(["id", "competitor", "sample"]).to_pylist()}
    assert len(keys) == marked.num_rows  # exactly one row per (item, competitor, sample)


def test_large_beats_small_and_both_labels_present(run):
    stats = json.loads((run["dir"] / "datasets" / "stats.json").read_text())
    large, small = stats["competitors"]["large"]["accuracy"], stats["competitors"]["small"]["accuracy"]
    assert 0 < small < large < 1
    kto = read_table(run["dir"] / "datasets" / "kto", KTO)
    assert 0 < pc.sum(kto["label"]).as_py() < kto.num_rows
    assert stats["labels"]["total"] == kto.num_rows


def test_trained_model_loads_and_changed(run):
    model_dir = run["dir"] / "model"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in model.parameters()) > 0
    base = load_file(Path(resolve_model("tiny:small")) / "model.safetensors")
    tuned = load_file(model_dir / "model.safetensors")
    assert set(base) <= set(tuned)  # DeepSpeed's save may write the tied lm_head too
    assert any(not torch.equal(base[k], tuned[k]) for k in base)
    metrics = json.loads((run["dir"] / "checkpoints" / "metrics.json").read_text())
    assert any("loss" in m for m in metrics)


def test_evaluation_reports_before_and_after(run):
    results = json.loads((run["dir"] / "eval" / "results.json").read_text())
    models = models_of(results)
    # The default job's recipe against SFT at the same budget, and the recipe's own SFT step, all
    # against the untrained target; baselines first, so each pair reads "recipe - baseline".
    assert list(models) == ["target-base", "target-sft", "target-rft", "target-recipe-sft", "target-kto"]
    assert all(r["answers"] == N_EVAL and r["items"] == N_EVAL for r in models.values())
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in models.values())
    assert len(results["pairs"]) == 10 and all(0.0 <= p["mcnemar_p"] <= 1.0 for p in results["pairs"])
    assert {(p["model"], p["baseline"]) for p in results["pairs"]} >= {
        ("target-kto", "target-sft"), ("target-kto", "target-base"), ("target-kto", "target-rft")}
    transfer = json.loads((run["dir"] / "eval" / "transfer" / "results.json").read_text())
    assert all(r["items"] == N_TRANSFER for r in models_of(transfer).values()) and len(models_of(transfer)) == 5
    text = (run["dir"] / "report.md").read_text()
    assert "## Transfer" in text and "and the methods compared with it at the same budget" in text
    assert "## Loss aversion" in text and "(report/value_function.png)" in text
    for label in ("target after KTO", "target after SFT", "target after RFT", "target after the recipe's SFT step"):
        assert label in text
    # The console summary: one row per model (eval, then transfer), the same table heads report.md.
    lines = run["first"].stdout.splitlines()
    for name in ("base", "sft", "rft", "recipe-sft", "kto"):
        assert sum(bool(re.match(rf"{name} +\d+\.\d \[", line)) for line in lines) == 2, name
    assert "transfer: arith-reworded (never trained on)" in run["first"].stdout
    assert text.index("| model | accuracy [95% CI] | items | Δ untrained | Δ SFT | Δ RFT |") < text.index("## Headline")


def test_recipe_chains_sft_on_policy_answers_and_kto(run):
    """SFT on the desirable rows, the SFT'd target's own graded answers on fresh train items, then
    KTO from the SFT model on those plus the competitors' rows; SFT alone gets the whole budget."""
    from lossaverse.pipeline.data.build import kto_table

    d = run["dir"]
    train = json.loads((d / "manifest.json").read_text())["stages"]["train"]
    recipe = train["recipe"]
    # One SFT run is both the SFT baseline (the whole budget) and, after SFT_STEPS, the recipe's start.
    assert recipe["sft_shared"] and train["steps"] == KTO_STEPS
    assert recipe["sft"]["steps"] == train["budget_steps"] == SFT_STEPS + KTO_STEPS == train["compare"]["sft"]["steps"]
    items = read_table(d / "items", ITEMS)
    answers = read_table(d / "recipe" / "on_policy" / "answers", ANSWERS)
    op = recipe["on_policy"]
    assert answers.num_rows == N_TRAIN * 4 == op["answers"]  # on_policy.samples 4, on_policy.items = n_train
    assert set(answers["competitor"].to_pylist()) == {"target"}
    assert set(answers["model"].to_pylist()) == {recipe["sft_model"]}
    fresh = set(answers["id"].to_pylist())
    assert len(fresh) == N_TRAIN and not fresh & set(items["id"].to_pylist())  # fresh: no item of this run
    kto = read_table(d / "recipe" / "datasets" / "kto", KTO)
    competitors = read_table(d / "datasets" / "kto", KTO)
    own = kto_table(read_table(d / "recipe" / "on_policy" / "marked", MARKED))
    assert kto.num_rows == competitors.num_rows + own.num_rows == train["rows"]
    assert op["rows"] == own.num_rows and op["desirable"] == pc.sum(own["label"]).as_py()
    # KTO started from the SFT model: its weights differ from both the SFT model and the base.
    sft = load_file(d / "recipe" / "sft" / "model" / "model.safetensors")
    kto_w = load_file(d / "model" / "model.safetensors")
    base = load_file(Path(resolve_model("tiny:small")) / "model.safetensors")
    assert any(not torch.equal(sft[k], base[k]) for k in base)
    assert any(not torch.equal(sft[k], kto_w[k]) for k in base)
    # The recipe's start is that run's model after SFT_STEPS, not its end: the SFT baseline went on.
    sft_end = load_file(d / "compare" / "sft" / "model" / "model.safetensors")
    assert any(not torch.equal(sft[k], sft_end[k]) for k in base)
    assert (d / "recipe" / "sft" / "model" / "config.json").is_file()


def test_baselines_share_the_step_budget(run):
    manifest = json.loads((run["dir"] / "manifest.json").read_text())
    train = manifest["stages"]["train"]
    assert set(train["compare"]) == {"sft", "rft"}
    assert train["compare"]["sft"]["steps"] == SFT_STEPS + train["steps"] == train["budget_steps"]
    assert train["compare"]["rft"]["steps"] == train["steps"]  # RFT: the KTO step's steps, from the same start
    assert (run["dir"] / "compare" / "sft" / "model" / "config.json").is_file()
    manifest = json.loads((run["dir"] / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"items", "generate", "mark", "datasets", "train", "evaluate"}


def test_rft_trains_from_the_recipes_sft_model_on_exactly_the_desirable_rows_of_its_data(run):
    """RFT (rejection-sampling fine-tuning): the recipe without its wrong answers. Same start as the
    KTO step (the recipe's SFT model), same data folder, same steps; it trains on the data's
    desirable rows, every one of them and nothing else."""
    import pyarrow.parquet as pq

    d = run["dir"]
    rft = json.loads((d / "manifest.json").read_text())["stages"]["train"]["compare"]["rft"]
    assert rft["start"] == str((d / "recipe" / "sft" / "model").resolve())
    assert rft["data"] == str((d / "recipe" / "datasets").resolve())
    kto = read_table(d / "recipe" / "datasets" / "kto", KTO)
    desirable = kto.filter(pc.equal(kto["label"], True))
    trained = pq.read_table(d / "compare" / "rft" / "checkpoints" / "data" / "train.parquet")
    key = lambda t: sorted(zip(t["prompt"].to_pylist(), t["completion"].to_pylist()))  # noqa: E731
    assert 0 < desirable.num_rows < kto.num_rows
    assert key(trained) == key(desirable)  # the right answers, each once; no wrong answer
    # Trained from the SFT model: its weights moved away from both the SFT start and the base.
    tuned = load_file(d / "compare" / "rft" / "model" / "model.safetensors")
    sft = load_file(d / "recipe" / "sft" / "model" / "model.safetensors")
    assert any(not torch.equal(sft[k], tuned[k]) for k in sft)


def test_sft_trains_on_exactly_the_competitors_right_answers(run):
    """The SFT run (the SFT baseline, and after SFT_STEPS the recipe's start): the desirable rows of
    the competitors' datasets/kto, every one of them and nothing else, a loss logged at each step."""
    import pyarrow.parquet as pq

    d = run["dir"]
    kto = read_table(d / "datasets" / "kto", KTO)
    desirable = kto.filter(pc.equal(kto["label"], True))
    trained = pq.read_table(d / "compare" / "sft" / "checkpoints" / "data" / "train.parquet")
    key = lambda t: sorted(zip(t["prompt"].to_pylist(), t["completion"].to_pylist()))  # noqa: E731
    assert 0 < desirable.num_rows < kto.num_rows
    assert key(trained) == key(desirable)
    metrics = json.loads((d / "compare" / "sft" / "checkpoints" / "metrics.json").read_text())
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, SFT_STEPS + KTO_STEPS + 1))


def test_rerun_skips_complete_stages(run):
    second = run["second"]
    assert second.returncode == 0, second.stderr[-2000:]
    for stage in ["items", "generate", "mark", "datasets", "train", "evaluate"]:
        assert f"skip {stage}" in second.stdout
    assert "every stage is complete: Ray not started" in second.stdout  # a rerun that only skips starts no Ray


def test_bad_config_fails_before_any_work(tmp_path):
    out = run_cli("run", str(ROOT / "configs" / "tiny.yaml"), "--set", f"output_dir={tmp_path}", "--set", "train.betta=1")
    assert out.returncode == 2
    assert "train.betta: Extra inputs are not permitted" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_evaluation_is_deterministic_given_the_seed(run):
    """Evaluated again from scratch: the same greedy answers, the same numbers. Two models do (the
    untrained target and the recipe: evaluate.baselines=false); the run's eval/ is put back after."""
    ev = run["dir"] / "eval"
    kept = run["dir"] / "eval-kept"
    shutil.copytree(ev, kept)
    try:
        before = json.loads((ev / "results.json").read_text())
        order = [("split", "ascending"), ("id", "ascending"), ("competitor", "ascending")]
        again = run_cli("evaluate", *run["args"][1:], "--set", "evaluate.baselines=false", "--force")
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
        after = json.loads((ev / "results.json").read_text())
        assert after["order"] == ["target-base", "target-kto"]
        for name in after["order"]:
            assert after[name] == before[name], name
        pair = lambda r: next(p for p in r["pairs"] if (p["model"], p["baseline"]) == ("target-kto", "target-base"))  # noqa: E731
        assert pair(after) == pair(before)
        answers = read_table(kept / "answers", ANSWERS)
        answers = answers.filter(pc.is_in(answers["competitor"], pa.array(after["order"]))).sort_by(order)
        fresh = read_table(ev / "answers", ANSWERS).sort_by(order)
        assert fresh.num_rows == answers.num_rows == 2 * (N_EVAL + N_TRANSFER)
        assert fresh["completion"].to_pylist() == answers["completion"].to_pylist()
    finally:
        shutil.rmtree(ev)
        kept.rename(ev)


def test_the_console_is_quiet_and_the_library_logs_are_in_the_run(run):
    """The product's own lines on the console (progress per stage and competitor, the summary);
    Ray's, Ray Data's and vLLM's output in <run>/logs/ (the driver's, and Ray's workers')."""
    out = run["first"].stdout + run["first"].stderr
    assert "logging_progress" not in out and "INFO worker.py" not in out and "Calling ray.init" not in out
    assert "generate large:" in run["first"].stdout and "generate small:" in run["first"].stdout
    assert len(out.splitlines()) <= 80, out
    logs = run["dir"] / "logs"
    assert "Started a local Ray instance" in (logs / "driver.log").read_text()
    assert any(p.name.startswith("raylet") for p in (logs / "ray").rglob("*"))
    assert f"report: {run['dir'] / 'report.md'}" in run["first"].stdout
