"""End-to-end tier: the real `lossaverse run` (Ray, vLLM CPU, Ray Train + DeepSpeed + TRL KTO) on
tiny models, with a JSONL benchmark in GSM8K's own format that holds some malformed rows."""

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline import synthetic
from pipeline.evalstats import models_of
from pipeline.rundir import read_table
from pipeline.schemas import ANSWERS, ITEMS, KTO, MARKED, QUARANTINE
from pipeline.tinymodels import resolve_model
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e

N_TRAIN, N_EVAL, SAMPLES, BAD_ROWS, N_TRANSFER = 40, 24, 2, 3, 12


def _gsm8k_jsonl(path: Path, split: str, n: int, bad: bool) -> None:
    lines = [json.dumps({"question": r["question"], "answer": f"{r['solution']}\n#### {r['reference']}"})
             for r in synthetic.problems(split, n, seed=7)]
    if bad:
        lines[3:3] = ["{broken json", json.dumps({"question": "", "answer": "#### 1"}), json.dumps({"question": "No answer?"})]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    _gsm8k_jsonl(tmp / "train.jsonl", "train", N_TRAIN, bad=True)
    _gsm8k_jsonl(tmp / "test.jsonl", "eval", N_EVAL, bad=False)
    overrides = [
        f"output_dir={tmp / 'runs'}",
        "name=e2e",
        "benchmark.source=jsonl",
        f"benchmark.path={tmp}",
        f"benchmark.splits={{train: {tmp / 'train.jsonl'}, eval: {tmp / 'test.jsonl'}}}",
        "benchmark.columns={reference: answer}",
        "benchmark.reference_after='####'",
        f"generate.sampling.samples={SAMPLES}",
        "benchmark.n_validation=0",
        f"evaluate.transfer.n_eval={N_TRANSFER}",
    ]
    args = ["run", str(ROOT / "configs" / "local.yaml")] + [a for o in overrides for a in ("--set", o)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli(*args)
    return {"dir": tmp / "runs" / "e2e", "first": first, "second": second, "args": args}


def test_every_row_is_accounted_for(run):
    d = run["dir"]
    items = read_table(d / "items", ITEMS)
    quarantine = read_table(d / "items" / "quarantine", QUARANTINE)
    assert items.num_rows + quarantine.num_rows == N_TRAIN + BAD_ROWS + N_EVAL
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
    # The default job compares KTO with the DPO and SFT baselines, all against the untrained target.
    assert list(models) == ["target-base", "target-kto", "target-dpo", "target-sft"]
    assert all(r["answers"] == N_EVAL and r["items"] == N_EVAL for r in models.values())
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in models.values())
    assert len(results["pairs"]) == 6 and all(0.0 <= p["mcnemar_p"] <= 1.0 for p in results["pairs"])
    transfer = json.loads((run["dir"] / "eval" / "transfer" / "results.json").read_text())
    assert all(r["items"] == N_TRANSFER for r in models_of(transfer).values()) and len(models_of(transfer)) == 4
    text = (run["dir"] / "report.md").read_text()
    assert "## Transfer" in text and "Methods compared on the same data with the same budget" in text
    for label in ("target after KTO", "target after DPO", "target after SFT", "transfer: arith-reworded"):
        assert label in run["first"].stdout


def test_baselines_share_the_step_budget(run):
    manifest = json.loads((run["dir"] / "manifest.json").read_text())
    train = manifest["stages"]["train"]
    assert set(train["compare"]) == {"dpo", "sft"}
    assert train["compare"]["dpo"]["steps"] == train["compare"]["sft"]["steps"] == train["steps"] == train["budget_steps"]
    for method in ("dpo", "sft"):
        assert (run["dir"] / "compare" / method / "model" / "config.json").is_file()
    manifest = json.loads((run["dir"] / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"items", "generate", "mark", "datasets", "train", "evaluate"}


def test_rerun_skips_complete_stages(run):
    second = run["second"]
    assert second.returncode == 0, second.stderr[-2000:]
    for stage in ["items", "generate", "mark", "datasets", "train", "evaluate"]:
        assert f"skip {stage}" in second.stdout


def test_bad_config_fails_before_any_work(tmp_path):
    out = run_cli("run", str(ROOT / "configs" / "local.yaml"), "--set", f"output_dir={tmp_path}", "--set", "train.betta=1")
    assert out.returncode == 2
    assert "train.betta: Extra inputs are not permitted" in out.stderr
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_evaluation_is_deterministic_given_the_seed(run):
    """Evaluated again from scratch: the same greedy answers, the same numbers."""
    before = (run["dir"] / "eval" / "results.json").read_text()
    answers = read_table(run["dir"] / "eval" / "answers", ANSWERS).sort_by([("id", "ascending"), ("competitor", "ascending")])
    again = run_cli("evaluate", *run["args"][1:], "--force")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert (run["dir"] / "eval" / "results.json").read_text() == before
    fresh = read_table(run["dir"] / "eval" / "answers", ANSWERS).sort_by([("id", "ascending"), ("competitor", "ascending")])
    assert fresh["completion"].to_pylist() == answers["completion"].to_pylist()
