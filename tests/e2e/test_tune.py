"""End-to-end: `lossaverse tune` trains one trial per grid value and scores each on validation items
carved from the train split; the eval split is never generated, and tune.json ranks the trials."""

import json

import pyarrow.compute as pc
import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    sets = [f"output_dir={tmp}", "name=tune", "benchmark.n_train=12", "benchmark.n_validation=12", "benchmark.n_eval=8",
            "generate.sampling.samples=1", "train.recipe=single", "train.compare=[kto, sft]", "train.max_steps=3", "train.num_workers=1",
            "train.deepspeed=none", "train.checkpoint_every=0"]
    args = ["tune", str(ROOT / "configs" / "tiny.yaml"), "--grid", "train.learning_rate=1e-5,2e-3"]
    result = run_cli(*args, *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    return tmp / "tune", result.stdout


def test_trials_are_ranked_on_validation_items(tuned):
    top, out = tuned
    doc = json.loads((top / "tune.json").read_text())
    assert doc["split"] == "validation" and doc["items"] == 12
    trials = doc["trials"]
    assert sorted(t["trial"] for t in trials) == ["learning_rate-1e-5", "learning_rate-2e-3"]
    assert trials[0]["validation_accuracy"] >= trials[1]["validation_accuracy"]
    assert doc["best"] == trials[0]["set"] and "best: --set " + doc["best"][0] in out
    for t in trials:
        assert t["items"] == 12 and t["method"] == "kto"  # compare is off in trials: one method each
        assert t["gain"] == pytest.approx(t["validation_accuracy"] - t["base_accuracy"])
    # train.compare's SFT is one baseline trial at the same budget; every trial is paired against it.
    (baseline,) = doc["baselines"]
    assert baseline["trial"] == "baseline-sft" and baseline["method"] == "sft" and baseline["steps"] == 3
    for t in trials:
        vs = t["vs"]["sft"]
        assert vs["items"] == 12
        assert vs["diff"] == pytest.approx(t["validation_accuracy"] - baseline["validation_accuracy"])


def test_the_eval_split_is_never_answered(tuned):
    top, _ = tuned
    items = read_table(top / "items", ITEMS)
    validation = set(items.filter(pc.equal(items["split"], "validation"))["id"].to_pylist())
    train = set(items.filter(pc.equal(items["split"], "train"))["id"].to_pylist())
    assert len(validation) == 12 and not validation & train
    assert set(read_table(top / "answers", ANSWERS)["id"].to_pylist()) == train
    for trial in (top / "tune").iterdir():
        answers = read_table(trial / "eval" / "answers", ANSWERS)
        assert set(answers["split"].to_pylist()) == {"validation"} and set(answers["id"].to_pylist()) == validation
        assert not (trial / "compare").exists()
