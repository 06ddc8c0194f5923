"""`lossaverse export`: a run's datasets as a Hugging Face datasets folder with a dataset card.

The run directory is made by the project's own code: items from the synthetic benchmark, answers
graded by the real marker (`mark_table`), datasets built by `build_dataset_dir`, and the manifest
entry recorded with the stage's real fingerprint.
"""

import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml
from typer.testing import CliRunner

from lossaverse.cluster.cli import app
from lossaverse.cluster.config import load_config
from lossaverse.cluster.stages import build_dataset_dir, stage_fingerprints
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.rundir import Manifest, read_table, write_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.marker.mark import mark_table
from lossaverse.pipeline.marker.markversion import marker_version
from lossaverse.pipeline.report.datacard import benchmark_source, size_category
from lossaverse.pipeline.report.export import DATASETS, ExportError, export_run
from lossaverse.pipeline.sources.benchmarks import load_items

CONFIG = ("name: exp\ncompetitors: {large: {path: 'tiny:large'}, small: {path: 'tiny:small'}}\n"
          "target: {path: 'tiny:small'}\nseed: 7\nbenchmark: {n_train: 12, n_eval: 4}\n")


def answers(items: pa.Table) -> pa.Table:
    """Two answers per train item: `large` right on every item, `small` right on every third one."""
    rows = []
    for i, item in enumerate(items.filter(pc.equal(items["split"], "train")).to_pylist()):
        for competitor, right in (("large", True), ("small", i % 3 == 0)):
            answer = item["reference"] if right else str(int(item["reference"]) + 1)
            rows.append({**item, "competitor": competitor, "model": competitor, "sample": 0,
                         "prompt": render(item, template_for("numeric")), "completion": f" The answer is {answer}.",
                         "finish_reason": "stop", "completion_tokens": 5, "error": None})
    return pa.Table.from_pylist(rows, schema=ANSWERS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "c.yaml").write_text(CONFIG)
    cfg = load_config(tmp / "c.yaml", [f"output_dir={tmp}"])
    items, _ = load_items(cfg.benchmark, cfg.seed)
    write_table(mark_table(answers(items)), cfg.run_dir / "marked")
    counts = build_dataset_dir(cfg.run_dir / "marked", cfg.run_dir / "datasets", seed=cfg.seed)
    manifest = Manifest(cfg.run_dir)
    manifest.update(config=cfg.model_dump(mode="json"), versions={"pyarrow": pa.__version__})
    manifest.record("datasets", stage_fingerprints(cfg)["datasets"], 0.1, **counts)
    return cfg.run_dir


def card_yaml(out) -> dict:
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_each_dataset_loads_as_its_own_config_with_the_source_rows(run_dir, tmp_path):
    import datasets

    counts = export_run(run_dir, tmp_path / "out")
    assert set(counts) == set(DATASETS)
    for name in DATASETS:
        source = read_table(run_dir / "datasets" / name)
        loaded = datasets.load_dataset(str(tmp_path / "out"), name, split="train", cache_dir=str(tmp_path / "cache"))
        assert loaded.num_rows == source.num_rows == counts[name] > 0
        assert loaded.column_names == source.column_names
    assert datasets.get_dataset_config_names(str(tmp_path / "out")) == list(DATASETS)


def test_the_card_yaml_parses_and_holds_the_counts_and_provenance(run_dir, tmp_path):
    counts = export_run(run_dir, tmp_path / "out")
    meta = card_yaml(tmp_path / "out")
    assert meta["license"] == "apache-2.0" and meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    assert [c["config_name"] for c in meta["configs"]] == list(DATASETS)
    assert {c["config_name"]: c["data_files"] for c in meta["configs"]}["pairs"] == [{"split": "train", "path": "pairs/train-*.parquet"}]
    assert {i["config_name"]: i["splits"][0]["num_examples"] for i in meta["dataset_info"]} == counts
    text = (tmp_path / "out" / "README.md").read_text()
    kto = read_table(run_dir / "datasets" / "kto")
    desirable = sum(kto["label"].to_pylist())
    # 12 items: large right on all 12, small on items 0, 3, 6, 9 -> 16 desirable, 8 undesirable.
    assert (desirable, kto.num_rows - desirable) == (16, 8)
    assert "16 desirable and 8 undesirable rows" in text
    manifest_fp = Manifest(run_dir).stage("datasets")["fingerprint"]
    for needle in ("`tiny:large`", "`tiny:small`", "Seed 7", manifest_fp, marker_version(), "`arith`"):
        assert needle in text


def test_hub_benchmarks_are_named_by_their_id_with_a_known_or_unknown_licence():
    license, text = benchmark_source({"source": "huggingface", "path": "openai/gsm8k", "subset": "main", "name": "gsm8k"})
    assert license == "mit" and "`openai/gsm8k` (subset `main`)" in text
    license, text = benchmark_source({"source": "huggingface", "path": "someone/quiz", "name": "quiz"})
    assert license == "unknown" and "https://huggingface.co/datasets/someone/quiz" in text
    assert size_category(999) == "n<1K" and size_category(1000) == "1K<n<10K"


def test_a_missing_or_incomplete_run_directory_is_named(run_dir, tmp_path):
    with pytest.raises(ExportError, match=r"run directory .*nowhere does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "out")
    partial = tmp_path / "partial"
    write_table(read_table(run_dir / "datasets" / "kto"), partial / "datasets" / "kto")
    with pytest.raises(ExportError, match=r"incomplete: missing manifest.json, datasets/pairs/, datasets/negatives/, datasets/stats.json"):
        export_run(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_dir_is_refused_unless_forced_and_replaced_whole(run_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"is not empty; pass --force to replace it"):
        export_run(run_dir, out)
    assert (out / "old.txt").read_text() == "keep me"
    export_run(run_dir, out, force=True)
    assert sorted(os.listdir(out)) == ["README.md", *sorted(DATASETS)]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left beside it
    with pytest.raises(ExportError, match=r"holds the run directory"):
        export_run(run_dir, run_dir.parent, force=True)


def test_the_command_exports_and_refuses_a_second_time_with_exit_code_2(run_dir, tmp_path):
    out = tmp_path / "out"
    first = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
    assert first.exit_code == 0, first.output
    assert "kto: 24 rows" in first.output and (out / "README.md").is_file()
    second = CliRunner().invoke(app, ["export", str(run_dir), str(out)])
    assert second.exit_code == 2 and "is not empty; pass --force" in second.output
