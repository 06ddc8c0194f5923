"""Training without Ray: config checks, KTO weights, memory planning, dataset checks, storage."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from lossaverse.cluster.config import ConfigError, TrainConfig, load_config
from lossaverse.cluster.stages import build_dataset_dir, stage_fingerprints
from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.rundir import write_table
from lossaverse.pipeline.data.schemas import KTO, MARKED
from tests.conftest import ROOT
from lossaverse.training.kto import kto_weights
from lossaverse.training.methods import METHODS, get_method, kto_rows
from lossaverse.training.train import console_line, prepare_storage, shuffled
from lossaverse.training.validate import check_memory, plan_training
from lossaverse.training.zero import model_state_gib

LOCAL = ROOT / "configs" / "tiny.yaml"


def marked(items: int, large_right: bool = True, small_right: bool = False, error_row: bool = True) -> pa.Table:
    """Marked answers for `items` synthetic problems, one per competitor; item 0's small answer is
    an inference error (left out of datasets/kto and pairs)."""
    rows = []
    for i, p in enumerate(synthetic.problems("train", items, seed=3)):
        for competitor, right in (("large", large_right), ("small", small_right)):
            answer = p["reference"] if right else str(int(p["reference"]) + 1 + i % 3)
            error = "engine error" if error_row and i == 0 and competitor == "small" else None
            rows.append(dict(
                id=f"q{i}", question=p["question"], reference=p["reference"], kind="numeric", choices=None,
                split="train", source="synthetic", competitor=competitor, model=competitor, sample=0,
                prompt=render(p, template_for("numeric")), completion="" if error else f" The answer is {answer}.",
                finish_reason="error" if error else "stop", completion_tokens=6, error=error,
                correct=right and not error, extracted=None if error else answer,
                reason="error" if error else ("match" if right else "mismatch"), marked_by="rules",
            ))
    return pa.Table.from_pylist(rows, schema=MARKED)


def make_datasets(tmp: Path, items: int = 17, **kw) -> Path:
    """datasets/{kto,negatives,pairs} and stats.json, built by the real builder."""
    write_table(marked(items, **kw), tmp / "marked")
    build_dataset_dir(tmp / "marked", tmp / "datasets")
    return tmp / "datasets"


BASE = "name: t\ncompetitors: {large: {path: 'tiny:large'}, small: {path: 'tiny:small'}}\ntarget: {path: 'tiny:small'}\n"


def load(tmp_path, *overrides) -> TrainConfig:
    """A minimal config file with `--set` overrides, loaded the way the CLI loads it."""
    path = tmp_path / "c.yaml"
    path.write_text(BASE)
    return load_config(path, list(overrides)).train


# --- config checks: they fail when the config is loaded, before Ray starts ---


def test_unknown_method_lists_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown training method 'ppo'; valid: \['dpo', 'kto', 'sft'\]"):
        get_method("ppo")
    with pytest.raises(ConfigError, match=r"train\.method: unknown training method 'ppo'"):
        load(tmp_path, "train.method=ppo")


def test_micro_batch_of_one_is_refused_for_kto_only(tmp_path):
    with pytest.raises(ConfigError, match="set train.per_device_batch_size >= 2"):
        load(tmp_path, "train.per_device_batch_size=1")
    assert load(tmp_path, "train.method=dpo", "train.per_device_batch_size=1").per_device_batch_size == 1


def test_auto_weights_and_explicit_weights_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match=r"weights: auto sets .*remove \['desirable_weight'\]"):
        load(tmp_path, "train.weights=auto", "train.desirable_weight=2")
    with pytest.raises(ConfigError, match="set loss_aversion .* or undesirable_weight, not both"):
        load(tmp_path, "train.loss_aversion=2", "train.undesirable_weight=3")


def test_deepspeed_file_that_contradicts_the_trainer_is_refused(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8,
                              "gradient_accumulation_steps": "auto", "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"train.deepspeed={ds}")
    msg = str(err.value)
    assert "train_micro_batch_size_per_gpu=8 but the trainer uses 4 (train.per_device_batch_size)" in msg
    assert "bf16.enabled=true but training runs fp32 (CPU, train.bf16 unset or false)" in msg
    # train.bf16: true on CPU matches it; a file fixing bf16 off contradicts it.
    assert load(tmp_path, f"train.deepspeed={ds}", "train.per_device_batch_size=8", "train.bf16=true").bf16_on
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}))
    with pytest.raises(ConfigError, match=r"bf16.enabled=false but training runs bf16 \(GPU, or train.bf16: true\)"):
        load(tmp_path, f"train.deepspeed={ds}", "train.bf16=true")
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}))
    assert load(tmp_path, f"train.deepspeed={ds}").deepspeed == str(ds)


def test_offload_without_gpus_and_unknown_deepspeed_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="offload_optimizer/offload_param .* use deepspeed: zero3"):
        load(tmp_path, "train.deepspeed=zero3_offload")
    assert load(tmp_path, "train.deepspeed=zero3_offload", "train.use_gpu=true").use_gpu
    with pytest.raises(ConfigError, match=r"unknown DeepSpeed config 'zero4'; valid: \['zero2', 'zero3', 'zero3_offload', 'none'\]"):
        load(tmp_path, "train.deepspeed=zero4")


def test_resume_flag_leaves_the_run_fingerprint_and_manifest_alone(tmp_path):
    plain = load_config(LOCAL)
    resumed = load_config(LOCAL, ["train.resume=true"])
    assert resumed.train.resume and "resume" not in resumed.model_dump()["train"]
    assert stage_fingerprints(plain) == stage_fingerprints(resumed)


def test_train_resume_runs_the_train_stage_with_train_resume_set(monkeypatch):
    """`lossaverse train CONFIG --resume` is the train stage with train.resume=true on top of --set."""
    import lossaverse.cluster.cli as cli

    calls = []
    monkeypatch.setattr(cli, "_command", lambda config, overrides, stages, force, address: calls.append((overrides, stages)))
    out = CliRunner().invoke(cli.app, ["train", str(LOCAL), "--set", "train.max_steps=3", "--resume"])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(cli.app, ["train", str(LOCAL)])
    assert out.exit_code == 0, out.output
    assert calls == [(["train.max_steps=3", "train.resume=true"], ["train"]), ([], ["train"])]


# --- KTO weights (Ethayarajh et al. 2024, Sec. 4.2: lambda_D n_D / (lambda_U n_U) in [1, 4/3]) ---


def test_fixed_weights_and_loss_aversion():
    w = kto_weights(TrainConfig(desirable_weight=1.0, loss_aversion=2.0), 405, 619)
    # lambda_U = 2 * 1; ratio = 1 * 405 / (2 * 619) = 0.3271
    assert (w.desirable, w.undesirable, round(w.ratio, 4), w.loss_aversion) == (1.0, 2.0, 0.3271, 2.0)


def test_auto_weights_put_the_ratio_at_the_low_end_of_the_range():
    w = kto_weights(TrainConfig(weights="auto"), 405, 619)
    # lambda_U = 1, lambda_D = 619 / 405 = 1.5284, ratio = 1.5284 * 405 / 619 = 1
    assert (round(w.desirable, 4), w.undesirable, round(w.ratio, 6)) == (1.5284, 1.0, 1.0)


def test_auto_weights_check_loss_aversion_against_the_data():
    # n_D = 300, n_U = 200: loss_aversion = lambda_U / lambda_D must be in [300/(4/3 * 200), 300/200] = [1.125, 1.5]
    w = kto_weights(TrainConfig(weights="auto", loss_aversion=1.2), 300, 200)
    assert round(w.desirable, 4) == 0.8333 and round(w.ratio, 4) == 1.25
    with pytest.raises(ValueError, match=r"loss_aversion=2.0 puts .* at 0.750, .* set loss_aversion in \[1.125, 1.500\]"):
        kto_weights(TrainConfig(weights="auto", loss_aversion=2.0), 300, 200)


def test_auto_weights_with_one_label_only():
    w = kto_weights(TrainConfig(weights="auto"), 0, 50)
    assert (w.desirable, w.undesirable, w.ratio) == (1.0, 1.0, None)


# --- memory planning (Rajbhandari et al. 2020, Fig. 1: 7.5B parameters, 64 GPUs, mixed-precision Adam) ---


@pytest.mark.parametrize("stage, gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_model_state_memory_matches_the_zero_paper(stage, gb):
    gib = model_state_gib(7_500_000_000, stage=stage, workers=64, offload_optimizer=False, offload_params=False,
                          bf16=True, reference_copy=False)
    assert round(gib * 2**30 / 1e9, 1) == gb


def test_a_model_that_does_not_fit_names_the_fixes():
    train = TrainConfig(use_gpu=True, num_workers=8, memory_per_worker_gib=80)
    # 7B: 2*7 (weights) + 2*7/8 (grads) + 12*7/8 (Adam) + 2*7 (reference) = 40.25e9 bytes = 37.5 GiB
    assert round(check_memory(7_000_000_000, 7_000_000_000, train, uses_reference=True), 1) == 37.5
    with pytest.raises(ConfigError) as err:
        check_memory(70_000_000_000, 70_000_000_000, train, uses_reference=True)
    msg = str(err.value)
    assert "needs about 374.9 GiB per worker" in msg and "memory_per_worker_gib=80" in msg
    for fix in ("deepspeed: zero3", "zero3_offload", "precompute_ref_log_probs: true", "lora:"):
        assert fix in msg


# --- dataset checks ---


def test_dpo_without_pairs_is_refused(tmp_path):
    datasets = make_datasets(tmp_path, large_right=False)
    with pytest.raises(ConfigError, match="DPO needs pairs .* use method: kto"):
        plan_training(TrainConfig(method="dpo"), datasets, None)


def test_sft_without_correct_answers_is_refused(tmp_path):
    datasets = make_datasets(tmp_path, large_right=False)
    with pytest.raises(ConfigError, match="SFT learns from correct answers .* use method: kto"):
        plan_training(TrainConfig(method="sft"), datasets, None)


def test_kto_on_negatives_only_is_planned(tmp_path):
    plan = plan_training(TrainConfig(weights="auto"), make_datasets(tmp_path, large_right=False), (1000, 1000))
    assert plan.info["desirable"] == 0 and plan.info["undesirable"] == 33 and plan.info["weight_ratio"] is None
    assert plan.method_args["undesirable_weight"] == 1.0 and plan.table.column_names == ["prompt", "completion", "label"]


def test_methods_select_their_rows(tmp_path):
    datasets = make_datasets(tmp_path)
    sft = plan_training(TrainConfig(method="sft"), datasets, None)
    assert sft.table.num_rows == 17 and sft.table.column_names == ["prompt", "completion"]
    assert all("The answer is" in c for c in sft.table["completion"].to_pylist())
    dpo = plan_training(TrainConfig(method="dpo"), datasets, None)
    assert dpo.table.num_rows == 16 and dpo.method_args == {"beta": 0.1, "precompute_ref_log_probs": False}
    kto = plan_training(TrainConfig(weights="auto"), datasets, None)
    # 17 desirable (large), 16 undesirable (small, one error row left out): lambda_D = 16/17
    assert round(kto.method_args["desirable_weight"], 4) == 0.9412 and kto.info["weight_ratio"] == 1.0


def kto_rows_of(spec: list[tuple[str, str, bool]]) -> pa.Table:
    """datasets/kto rows from (competitor, item id, label), in order; sample numbers count per (competitor, id)."""
    seen: dict = {}
    rows = []
    for comp, item, label in spec:
        seen[(comp, item)] = seen.get((comp, item), -1) + 1
        rows.append(dict(prompt=f"Q {item}", completion=f" {comp} {seen[(comp, item)]}", label=label, id=item,
                         competitor=comp, sample=seen[(comp, item)]))
    return pa.Table.from_pylist(rows, schema=KTO)


def test_negatives_keep_every_right_answer_and_only_the_targets_own_wrong_ones():
    """Item a: the target right once, wrong twice (mixed); item b: the target wrong only; the
    competitors wrong on both. all: 9 rows; on_policy: the 3 right + the target's 3 wrong = 6;
    mixed: the 3 right + the target's 2 wrong on item a = 5, in the table's order."""
    t = kto_rows_of([("large", "a", True), ("small", "a", False), ("large", "b", False), ("target", "a", False),
                     ("target", "a", True), ("target", "a", False), ("target", "b", False), ("small", "b", True),
                     ("small", "b", False)])
    assert kto_rows(t, "all") == t
    on_policy = kto_rows(t, "on_policy")
    assert on_policy["completion"].to_pylist() == [" large 0", " target 0", " target 1", " target 2", " target 0",
                                                   " small 0"]
    mixed = kto_rows(t, "mixed")
    assert mixed["completion"].to_pylist() == [" large 0", " target 0", " target 1", " target 2", " small 0"]
    assert [(r["competitor"], r["label"]) for r in mixed.to_pylist() if not r["label"]] == [("target", False)] * 2
    with pytest.raises(ValueError, match="valid: \\['all', 'mixed', 'on_policy'\\]"):
        kto_rows(t, "some")


def test_the_kto_plan_counts_the_negatives_it_keeps(tmp_path):
    """With train.negatives the KTO weights come from the rows trained on, not from stats.json's
    counts of the whole dataset; RFT's rows (the right ones) are the same either way."""
    spec = [("large", f"q{i}", i % 2 == 0) for i in range(8)] + [
        ("target", "q0", True), ("target", "q0", False), ("target", "q1", False), ("target", "q1", False),
        ("target", "q2", True), ("target", "q2", True), ("target", "q3", False), ("target", "q3", True)]
    write_table(kto_rows_of(spec), tmp_path / "datasets" / "kto")
    (tmp_path / "datasets" / "stats.json").write_text(json.dumps({"labels": {"desirable": 8, "undesirable": 8, "total": 16}}))
    train = TrainConfig(recipe="sft_then_kto", max_steps=2, weights="auto", negatives="mixed")
    plan = plan_training(train, tmp_path / "datasets", None)
    # right: large q0 q2 q4 q6 and the target's 4 (8); the target's wrong answers: q0, q1 twice, q3, of
    # which q0 and q3 are on items it also got right. lambda_D = n_U / n_D = 2/8.
    assert (plan.info["desirable"], plan.info["undesirable"], plan.table.num_rows) == (8, 2, 10)
    assert plan.method_args["desirable_weight"] == 0.25
    on_policy = plan_training(train.model_copy(update={"negatives": "on_policy"}), tmp_path / "datasets", None)
    assert (on_policy.info["desirable"], on_policy.info["undesirable"]) == (8, 4) and on_policy.table.num_rows == 12
    every = plan_training(train.model_copy(update={"negatives": "all"}), tmp_path / "datasets", None)
    assert (every.info["desirable"], every.info["undesirable"]) == (8, 8) and every.table.num_rows == 16
    sft = plan_training(train.model_copy(update={"method": "sft", "recipe": "single", "negatives": "all"}),
                        tmp_path / "datasets", None)
    assert sft.table.num_rows == 8


def test_negatives_other_than_all_need_the_recipe(tmp_path):
    with pytest.raises(ConfigError, match="train.negatives 'mixed' keeps the SFT'd target's own wrong answers"):
        load(tmp_path, "train.negatives=mixed")
    with pytest.raises(ConfigError, match="valid|Input should be"):
        load(tmp_path, "train.negatives=some")


def test_fewer_rows_than_one_global_batch_is_refused(tmp_path):
    datasets = make_datasets(tmp_path, items=3)
    with pytest.raises(ConfigError, match="5 training rows .* fewer than one global batch .* = 8"):
        plan_training(TrainConfig(num_workers=2, per_device_batch_size=4), datasets, None)


def test_missing_datasets_and_unknown_params_are_named(tmp_path):
    with pytest.raises(ConfigError, match="datasets/kto is missing: run `lossaverse mark`"):
        plan_training(TrainConfig(), tmp_path / "datasets", None)
    with pytest.raises(ConfigError, match="set target.params or unset train.memory_per_worker_gib"):
        plan_training(TrainConfig(memory_per_worker_gib=10), make_datasets(tmp_path), None)


# --- storage and console ---


def test_shuffle_is_seeded_and_keeps_every_row():
    table = pa.table({"x": list(range(50))})
    a, b, c = shuffled(table, 0), shuffled(table, 0), shuffled(table, 1)
    assert a["x"].to_pylist() == b["x"].to_pylist() != c["x"].to_pylist()
    assert sorted(a["x"].to_pylist()) == list(range(50)) and a["x"].to_pylist() != list(range(50))


def test_the_shuffle_does_not_depend_on_the_order_the_rows_come_in():
    """The datasets hold their rows in the order the marking tasks finished: the same rows in
    another order train in the same order."""
    rows = {"prompt": [f"q{i % 7}" for i in range(40)], "completion": [f"a{i}" for i in range(40)],
            "label": [i % 3 == 0 for i in range(40)]}
    table = pa.table(rows)
    other = table.take(np.random.default_rng(5).permutation(40))
    assert other["completion"].to_pylist() != table["completion"].to_pylist()
    assert shuffled(other, 0).to_pylist() == shuffled(table, 0).to_pylist()
    assert shuffled(other, 1).to_pylist() != shuffled(table, 0).to_pylist()


def test_resume_checks_the_config_and_a_fresh_start_clears_old_checkpoints(tmp_path):
    storage = tmp_path / "checkpoints"
    assert prepare_storage(storage, "fp-a", resume=True) is False  # nothing to resume: fresh start
    (storage / "ray_train").mkdir()
    assert prepare_storage(storage, "fp-a", resume=True) is True
    with pytest.raises(ConfigError, match="made with a different train config; run without --resume"):
        prepare_storage(storage, "fp-b", resume=True)
    assert prepare_storage(storage, "fp-b", resume=False) is False
    assert not (storage / "ray_train").exists() and (storage / "fingerprint").read_text().strip() == "fp-b"


def test_console_shows_every_tenth_and_the_last_step():
    entry = {"step": 10, "max_steps": 12, "loss": 0.5, "kl": 0.01, "rewards/chosen": 0.2, "rewards/rejected": -0.1,
             "rewards/margins": 0.3, "learning_rate": 5e-5, "tokens_per_second": 1234.5}
    line = console_line({**entry, "step": 100, "max_steps": 128})
    assert line == "step 100/128 loss 0.5000 kl 0.010 D +0.200 U -0.100 lr 5.0e-05 1,234 tok/s"
    assert len(line) < 80  # one line on a plain 80-column terminal
    assert console_line({**entry, "step": 11}) is None
    assert console_line({**entry, "step": 12}).startswith("step 12/12")


def test_every_method_is_registered_with_its_dataset():
    assert {name: m.dataset for name, m in METHODS.items()} == {"kto": "kto", "dpo": "pairs", "sft": "kto"}


def test_steady_state_rate_leaves_out_the_warmup_steps():
    from lossaverse.training.bench import steady_samples_per_second

    # steps 1-2 are warm-up (slow); steps 3-6 take 0.5 s each: 4 steps x 8 samples / 2 s = 16 samples/s
    timings = [(1, 5.0), (2, 3.0), (3, 0.5), (4, 0.5), (5, 0.5), (6, 0.5)]
    assert steady_samples_per_second(timings, global_batch=8, warmup=2) == 16.0
    with pytest.raises(ValueError, match="only 6 steps timed"):
        steady_samples_per_second(timings, global_batch=8, warmup=6)
