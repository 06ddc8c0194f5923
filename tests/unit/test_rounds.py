"""Rounds, validation items, compared methods and transfer, without Ray: the item blocks per
round, the datasets that accumulate, the fingerprints that chain rounds, the round summary and
its report, all from real Parquet and JSON written under the row contracts."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from rich.console import Console

from lossaverse.cluster.cli import _compare_set
from lossaverse.cluster.config import BenchmarkConfig, ConfigError, load_config
from lossaverse.cluster.rounds import round_summary
from lossaverse.cluster.stages import StageError, round_players, stage_fingerprints, trained_dirs
from lossaverse.cluster.summary import summary_table
from lossaverse.pipeline.data import synthetic
from lossaverse.pipeline.data.build import accumulate, build_datasets
from lossaverse.pipeline.data.rundir import read_table, write_json, write_table
from lossaverse.pipeline.data.schemas import MARKED
from lossaverse.pipeline.report.evalstats import evaluation_results
from lossaverse.pipeline.report.report import render_report
from lossaverse.pipeline.sources.benchmarks import BenchmarkError, load_items
from tests.conftest import ROOT
from tests.unit.test_report import rows

LOCAL = ROOT / "configs" / "tiny.yaml"


def _split_ids(items: pa.Table, split: str) -> list[str]:
    return items.filter(pc.equal(items["split"], split))["id"].to_pylist()


def test_validation_and_rounds_take_consecutive_blocks_of_the_train_stream():
    cfg = BenchmarkConfig(n_train=5, n_eval=4, n_validation=3)
    one, _ = load_items(cfg, seed=0, round=1)
    two, _ = load_items(cfg, seed=0, round=2)
    stream = [f"arith-train-{i:06d}" for i in range(13)]
    assert _split_ids(one, "validation") == _split_ids(two, "validation") == stream[:3]
    assert _split_ids(one, "train") == stream[3:8] and _split_ids(two, "train") == stream[8:13]
    assert _split_ids(one, "eval") == _split_ids(two, "eval") and len(_split_ids(one, "eval")) == 4
    # The blocks extend the stream: round 1 without validation starts where the plain benchmark does.
    plain, _ = load_items(BenchmarkConfig(n_train=5, n_eval=4), seed=0)
    assert _split_ids(plain, "train") == stream[:5]
    questions = dict(zip(two["id"].to_pylist(), two["question"].to_pylist()))
    assert questions[stream[8]] == synthetic.problems("train", 9, 0)[8]["question"]


def test_a_real_split_too_small_for_the_rounds_is_an_error(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"question": f"{i}+1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(6)))
    cfg = BenchmarkConfig(source="jsonl", name="gsm8k", path=str(tmp_path), splits={"train": str(train), "eval": str(train)},
                          columns={"reference": "answer"}, reference_after="####", n_train=4, n_validation=2)
    with pytest.raises(BenchmarkError, match="no train items left for round 2"):
        load_items(cfg, seed=0, round=2)


def test_reworded_family_asks_the_same_sums_in_other_words():
    plain, reworded = synthetic.problems("eval", 10, 3), synthetic.problems("eval", 10, 3, "arith-reworded")
    assert [p["reference"] for p in plain] == [p["reference"] for p in reworded]
    assert all(a["question"] != b["question"] for a, b in zip(plain, reworded))
    with pytest.raises(ValueError, match="unknown synthetic family 'nope'"):
        synthetic.problems("eval", 1, 0, "nope")
    with pytest.raises(ValueError, match="unknown synthetic benchmark name 'nope'"):
        BenchmarkConfig(name="nope")


def test_config_rounds_compare_and_validation_errors():
    cfg = load_config(LOCAL, ["rounds=3", "train.compare=[dpo, sft]"])
    assert cfg.rounds.count == 3 and cfg.train.methods == ["kto", "dpo", "sft"]
    assert cfg.at_round(3).run_dir == cfg.top_dir / "rounds" / "3" and cfg.run_dir == cfg.top_dir
    assert _compare_set("kto, dpo,sft") == ["train.compare=[kto, dpo, sft]"]
    with pytest.raises(ConfigError, match="unknown training method 'ppo'"):
        load_config(LOCAL, ["train.compare=[kto, ppo]"])
    with pytest.raises(ConfigError, match="round 2 is past rounds.count 1"):
        load_config(LOCAL, ["round=2"])
    with pytest.raises(ConfigError, match="set benchmark.n_validation"):
        load_config(LOCAL, ["evaluate.split=validation", "benchmark.n_validation=0"])


def test_fingerprints_chain_rounds_and_ignore_the_loop_settings():
    cfg = load_config(LOCAL, ["rounds=2"])
    one, two = stage_fingerprints(cfg.at_round(1)), stage_fingerprints(cfg.at_round(2))
    assert all(one[s] != two[s] for s in one)
    assert stage_fingerprints(load_config(LOCAL, ["rounds.count=5", "rounds.stop_when_no_gain=true"])) == one
    # Round 2 plays round 1's trained target: retraining round 1 changes round 2's answers.
    beta = load_config(LOCAL, ["rounds=2", "train.beta=0.3"])
    assert stage_fingerprints(beta.at_round(2))["generate"] != two["generate"]
    assert stage_fingerprints(beta.at_round(2))["items"] == two["items"]


def test_round_players_put_the_trained_target_in_the_small_seat_or_beside(tmp_path):
    cfg = load_config(LOCAL, [f"output_dir={tmp_path}", "rounds=2"])
    assert round_players(cfg) == dict(cfg.competitors)
    with pytest.raises(StageError, match="trained in round 1, but .*model is missing"):
        round_players(cfg.at_round(2))
    (cfg.top_dir / "model").mkdir(parents=True)
    (cfg.top_dir / "model" / "config.json").write_text("{}")
    replaced = round_players(cfg.at_round(2))
    assert sorted(replaced) == ["large", "small"] and replaced["small"].path == str((cfg.top_dir / "model").resolve())
    joined = round_players(load_config(LOCAL, [f"output_dir={tmp_path}", "rounds={count: 2, policy: join}"]).at_round(2))
    assert sorted(joined) == ["large", "small", "target"] and joined["small"] == cfg.competitors["small"]
    assert trained_dirs(cfg, tmp_path, "sft") == (tmp_path / "compare" / "sft" / "model", tmp_path / "compare" / "sft" / "checkpoints")


def _round_marked(round: int, offset: int) -> pa.Table:
    """Train answers of one round: 8 fresh items, large right on 6, small on 2."""
    out = []
    for name, right in (("large", 6), ("small", 2)):
        for r in rows(name, "train", [i < right for i in range(8)]):
            r["id"] = f"train-{offset + int(r['id'].split('-')[1]):03d}"
            out.append(r)
    return pa.Table.from_pylist(out, schema=MARKED)


def test_datasets_accumulate_tagged_by_round():
    first = accumulate(build_datasets(_round_marked(1, 0)), 1)
    second = accumulate(build_datasets(_round_marked(2, 8)), 2, {k: first[k] for k in ("kto", "negatives", "pairs")})
    for name in ("kto", "negatives", "pairs"):
        assert second[name].num_rows == 2 * first[name].num_rows
        assert second[name]["round"].to_pylist() == [1] * first[name].num_rows + [2] * first[name].num_rows
    assert second["stats"]["labels"]["total"] == 32 and second["stats"]["labels"]["desirable"] == 16
    assert second["stats"]["labels"]["rounds"] == [1, 2] and second["stats"]["round"] == 2
    assert second["stats"]["competitors"]["large"]["answers"] == 8  # this round's answers
    with pytest.raises(ValueError, match="lacks column"):
        accumulate(build_datasets(_round_marked(2, 8)), 2, {k: build_datasets(_round_marked(1, 0))[k] for k in ("kto", "negatives", "pairs")})


def _evaluated_round(run_dir, base: int, kto: int, n: int = 20) -> None:
    marked = pa.Table.from_pylist(rows("target-base", "eval", [i < base for i in range(n)])
                                  + rows("target-kto", "eval", [i < kto for i in range(n)]), schema=MARKED)
    write_table(marked, run_dir / "eval" / "marked")
    write_json(evaluation_results(marked, ["target-base", "target-kto"], seed=0), run_dir / "eval" / "results.json")
    built = build_datasets(_round_marked(1, 0))
    write_json(built["stats"], run_dir / "datasets" / "stats.json")
    write_table(built["kto"], run_dir / "datasets" / "kto")


def test_round_summary_gains_and_the_report_of_a_multi_round_run(tmp_path):
    cfg = load_config(LOCAL, [f"output_dir={tmp_path}", "name=r", "rounds=2"])
    _evaluated_round(cfg.round_dir(1), base=4, kto=14)
    _evaluated_round(cfg.round_dir(2), base=4, kto=15)
    one, two = round_summary(cfg.at_round(1)), round_summary(cfg.at_round(2))
    # Round 1: kto right on 10 more items than the base, none fewer: McNemar p = 2 / 2^10.
    assert one["gain"]["vs"] == "target-base" and one["gain"]["diff"] == pytest.approx(0.5)
    assert one["gain"]["mcnemar_p"] == pytest.approx(2 / 1024) and one["gain"]["significant"]
    # Round 2 against round 1's trained target: one more item, not significant.
    assert two["gain"]["vs"] == "round 1" and two["gain"]["diff"] == pytest.approx(0.05)
    assert two["gain"]["mcnemar_p"] == 1.0 and not two["gain"]["significant"]
    assert one["competitor large"]["accuracy"] == 0.75 and one["target-kto"]["accuracy"] == 0.7
    write_json([one, two], cfg.top_dir / "rounds.json")
    write_json({"config": {"name": "r", "seed": 0, "train": {"method": "kto"}}}, cfg.top_dir / "manifest.json")
    render_report(cfg.top_dir)
    text = (cfg.top_dir / "report.md").read_text()
    assert "| target after KTO (`target-kto`) | 75.0% |" in text  # the headline is the last round's
    assert "## Rounds" in text and "+5.0 [" in text and "vs round 1, p 1.000" in text
    assert (cfg.top_dir / "report" / "rounds.png").stat().st_size > 1000
    console = Console(record=True, width=200)
    console.print(summary_table(cfg.top_dir))
    table = console.export_text()
    assert "round 2: gain vs round 1 +5.0 points" in table and "\nkto " in table and " 75.0 [" in table


def test_transfer_results_get_their_own_report_section(tmp_path):
    run_dir = tmp_path / "t"
    _evaluated_round(run_dir, base=4, kto=6)
    marked = read_table(run_dir / "eval" / "marked", MARKED)
    write_json(evaluation_results(marked, seed=0), run_dir / "eval" / "transfer" / "results.json")
    render_report(run_dir)
    text = (run_dir / "report.md").read_text()
    assert "## Transfer: a benchmark the target was not trained on" in text
    assert text.count("| target after KTO (`target-kto`) | 30.0% |") == 2


def test_tune_grid_parsing_and_trial_names():
    from lossaverse.cluster.tune import parse_grid, trial_name

    grid = parse_grid(["train.learning_rate=1e-4,2e-3", "train.method=kto,sft"])
    # Values stay as YAML reads them ("1e-4" is a string to YAML 1.1); the config validates them.
    assert grid == {"train.learning_rate": ["1e-4", "2e-3"], "train.method": ["kto", "sft"]}
    assert load_config(LOCAL, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    assert trial_name({"train.learning_rate": 0.002, "train.beta": 0.1}) == "learning_rate-0.002_beta-0.1"
    for bad, message in ((["train.beta"], "expected KEY=V1,V2"), ([], "at least one --grid"),
                         (["train.beta=0.1", "train.beta=0.2"], "given twice")):
        with pytest.raises(ConfigError, match=message):
            parse_grid(bad)


def test_verdict_needs_the_ci_and_mcnemar_to_agree_and_models_keep_their_order():
    from lossaverse.pipeline.report.evalstats import models_of
    from lossaverse.pipeline.report.report import _verdict

    # 4 discordant items, all one way: the percentile CI excludes zero, the exact test (p = 2/16) does not.
    assert _verdict({"ci95": [0.002, 0.016], "mcnemar_p": 0.125}).startswith("not shown")
    assert _verdict({"ci95": [0.035, 0.070], "mcnemar_p": 5e-9}) == "better (CI above zero)"
    assert _verdict({"ci95": [-0.185, -0.143], "mcnemar_p": 1e-50}) == "worse (CI below zero)"
    assert _verdict({"ci95": [-0.007, 0.026], "mcnemar_p": 0.3}).startswith("no difference shown")
    marked = pa.Table.from_pylist(rows("target-base", "eval", [True, False]) + rows("target-sft", "eval", [True, True])
                                  + rows("target-kto", "eval", [False, True]), schema=MARKED)
    results = json.loads(json.dumps(evaluation_results(marked, ["target-base", "target-sft", "target-kto"]), sort_keys=True))
    assert list(models_of(results)) == ["target-base", "target-sft", "target-kto"]


def test_tune_keeps_the_earlier_trials_of_the_same_data_overrides_and_baselines():
    """One-factor grids run one after another add up to one ablation table (tune.json's baselines
    are stored as entries; they match on their methods)."""
    from lossaverse.cluster.tune import earlier_trials

    same = {"data": "d1", "overrides": []}
    before = {**same, "baselines": [{"method": "sft"}, {"method": "rft"}],
              "trials": [{"trial": "configured"}, {"trial": "nll_weight-1.0"}, {"trial": "beta-0.3"}]}
    now = [{"trial": "configured"}, {"trial": "desirable_weight-1.68"}]
    assert earlier_trials(before, same, ["rft", "sft"], now) == [{"trial": "nll_weight-1.0"}, {"trial": "beta-0.3"}]
    assert earlier_trials(before, {**same, "data": "d2"}, ["rft", "sft"], now) == []  # other data
    assert earlier_trials(before, {**same, "overrides": ["seed=1"]}, ["rft", "sft"], now) == []
    assert earlier_trials(before, same, ["sft"], now) == []  # other baselines
