"""The e2e tier's one whole loop: the real `lossaverse run` (Ray, vLLM CPU, Ray Train + DeepSpeed + TRL
KTO) on tiny models, with a JSONL benchmark in GSM8K's own format that holds some malformed rows.
Started once a session and read by every module that needs a finished run: test_run.py (rows,
recipe, baselines, report, console, rerun, determinism) and test_tune.py (`lossaverse tune` on the
same run directory, which reuses the run's data and train stages as `lossaverse run` would)."""

import json
from pathlib import Path

import pytest

from lossaverse.pipeline.data import synthetic
from tests.conftest import ROOT, run_cli

N_TRAIN, N_VALIDATION, N_EVAL, SAMPLES, BAD_ROWS, N_TRANSFER = 40, 12, 24, 2, 3, 12
SFT_STEPS, KTO_STEPS, CURVE_STEP = 2, 2, 1


def _gsm8k_jsonl(path: Path, split: str, n: int, bad: bool) -> None:
    lines = [json.dumps({"question": r["question"], "answer": f"{r['solution']}\n#### {r['reference']}"})
             for r in synthetic.problems(split, n, seed=7)]
    if bad:
        lines[3:3] = ["{broken json", json.dumps({"question": "", "answer": "#### 1"}), json.dumps({"question": "No answer?"})]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def whole_loop(tmp_path_factory):
    """The run, then the same command again (it only skips). {dir, first, second, args}."""
    tmp = tmp_path_factory.mktemp("e2e")
    # The validation items first, this round's train items, then the block the recipe's on-policy
    # answers come from (fresh train items).
    _gsm8k_jsonl(tmp / "train.jsonl", "train", N_VALIDATION + 2 * N_TRAIN, bad=True)
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
        f"benchmark.n_train={N_TRAIN}",
        f"benchmark.n_validation={N_VALIDATION}",  # for test_tune.py; the run never answers them
        f"evaluate.transfer.n_eval={N_TRANSFER}",
        # The default job's recipe (SFT, on-policy answers, KTO from the SFT model) at a few steps,
        # with the SFT run's model exported after CURVE_STEP too (tune's validation curve).
        f"train.sft_steps={SFT_STEPS}",
        f"train.max_steps={KTO_STEPS}",
        f"train.sft_curve=[{CURVE_STEP}]",
        # The RFT baseline beside SFT: the recipe's SFT start, its KTO step's data and steps.
        "train.compare=[kto, sft, rft]",
    ]
    args = ["run", str(ROOT / "configs" / "tiny.yaml")] + [a for o in overrides for a in ("--set", o)]
    first = run_cli(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = run_cli(*args)
    return {"dir": tmp / "runs" / "e2e", "first": first, "second": second, "args": args}
