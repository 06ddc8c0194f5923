"""End-to-end: two rounds of play through the real CLI (Ray, vLLM CPU, Ray Train + TRL), interrupted
in round 2 and run again: round 1 is not redone, round 2 finishes, and its data is right (fresh
items, round 1's trained target in the small seat, datasets of both rounds tagged by round)."""

import json
import os
import signal
import subprocess
import time

import pyarrow.compute as pc
import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS
from tests.conftest import LOSSAVERSE, ROOT

pytestmark = pytest.mark.e2e

N_TRAIN, N_EVAL = 16, 16


def _args(tmp) -> list[str]:
    sets = [f"output_dir={tmp}", "name=rounds", f"benchmark.n_train={N_TRAIN}", f"benchmark.n_eval={N_EVAL}",
            "benchmark.n_validation=0", "generate.sampling.samples=1", "rounds=2", "train.recipe=single", "train.compare=[]", "train.max_steps=4",
            "train.num_workers=1", "train.deepspeed=none", "train.checkpoint_every=0", "evaluate.transfer=null"]
    return [*LOSSAVERSE, "run", str(ROOT / "configs" / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    return env


def _interrupt_in_round_two(args: list[str], log) -> int:
    """Start the run; once round 2 has started generating, Ctrl-C it (SIGINT to its pid)."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env())
    seen_round_two = False
    try:
        for line in proc.stdout:
            log.write(line)
            seen_round_two |= "round 2/2" in line
            if seen_round_two and line.startswith("run generate"):
                time.sleep(5)
                proc.send_signal(signal.SIGINT)
                break
        proc.stdout.close()
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    args = _args(tmp)
    with open(tmp / "first.log", "w") as log:
        first_rc = _interrupt_in_round_two(args, log)
    first_log = (tmp / "first.log").read_text()
    assert "round 2/2" in first_log and first_rc != 0, first_log[-3000:]
    top = tmp / "rounds"
    assert not (top / "rounds.json").is_file() or len(json.loads((top / "rounds.json").read_text())) == 1
    stamp = (top / "model" / "config.json").stat().st_mtime_ns
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=_env())
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    return {"top": top, "second": second.stdout, "stamp": stamp}


def test_resume_skips_the_finished_round(rounds_run):
    out = rounds_run["second"]
    round_one = out.split("round 2/2")[0]
    for stage in ("items", "generate", "mark", "datasets", "train", "evaluate"):
        assert f"skip {stage}: complete" in round_one
    assert "run train" in out.split("round 2/2")[1]
    assert (rounds_run["top"] / "model" / "config.json").stat().st_mtime_ns == rounds_run["stamp"]


def test_rounds_summary_and_report(rounds_run):
    top = rounds_run["top"]
    rounds = json.loads((top / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["gain"]["vs"] == "target-base" and rounds[1]["gain"]["vs"] == "round 1"
    for r in rounds:
        assert r["target-base"]["items"] == r["target-kto"]["items"] == N_EVAL
        assert r["gain"]["ci95"][0] <= r["gain"]["diff"] <= r["gain"]["ci95"][1]
    # Greedy decoding of the same untrained model on the same items: the same accuracy each round.
    assert rounds[0]["target-base"]["accuracy"] == rounds[1]["target-base"]["accuracy"]
    text = (top / "report.md").read_text()
    assert "## Rounds" in text and (top / "report" / "rounds.png").stat().st_size > 1000
    assert "round 2: gain vs round 1" in rounds_run["second"]


def test_round_two_plays_fresh_items_with_the_trained_target(rounds_run):
    top = rounds_run["top"]
    one = read_table(top / "items", ITEMS)
    two = read_table(top / "rounds" / "2" / "items", ITEMS)
    train = lambda t: set(t.filter(pc.equal(t["split"], "train"))["id"].to_pylist())  # noqa: E731
    assert len(train(one)) == len(train(two)) == N_TRAIN and not train(one) & train(two)
    answers = read_table(top / "rounds" / "2" / "answers", ANSWERS)
    small = set(answers.filter(pc.equal(answers["competitor"], "small"))["model"].to_pylist())
    assert small == {str((top / "model").resolve())}
    assert set(answers["id"].to_pylist()) == train(two)
    kto = read_table(top / "rounds" / "2" / "datasets" / "kto")
    first = read_table(top / "datasets" / "kto")
    assert sorted(set(kto["round"].to_pylist())) == [1, 2]
    assert kto.filter(pc.equal(kto["round"], 1)).num_rows == first.num_rows
