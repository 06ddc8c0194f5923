import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lossaverse.cluster.config import BenchmarkConfig
from lossaverse.pipeline.data.schemas import ITEMS
from lossaverse.pipeline.sources.benchmarks import BenchmarkError, load_items


def test_synthetic_is_deterministic_by_seed():
    cfg = BenchmarkConfig(n_train=20, n_eval=10)
    a, _ = load_items(cfg, seed=3)
    b, _ = load_items(cfg, seed=3)
    c, _ = load_items(cfg, seed=4)
    assert a.equals(b) and not a.equals(c)
    assert a.schema == ITEMS and a.num_rows == 30
    assert sorted(set(a["split"].to_pylist())) == ["eval", "train"]
    assert len(set(a["id"].to_pylist())) == 30


def test_jsonl_bad_rows_are_quarantined_and_none_lost(tmp_path):
    lines = [
        json.dumps({"question": "1+1?", "answer": "Work: 1+1=2\n#### 2"}),
        "{not json",
        json.dumps({"question": "", "answer": "#### 3"}),
        json.dumps({"question": "2+2?"}),
        json.dumps({"question": "3+3?", "answer": "no marker"}),
        json.dumps({"question": "4+4?", "answer": "#### 8"}),
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps({"question": "5+5?", "answer": "#### 10"}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", name="gsm8k", path=str(tmp_path), splits={"train": str(train), "eval": str(test)},
                          columns={"reference": "answer"}, reference_after="####")
    items, quarantine = load_items(cfg, seed=0)
    assert items.num_rows + quarantine.num_rows == len(lines) + 1
    assert items["reference"].to_pylist() == ["2", "8", "10"]
    reasons = " | ".join(quarantine["reason"].to_pylist())
    assert "not valid JSON" in reasons
    assert "missing or empty 'question'" in reasons
    assert "missing or empty 'answer'" in reasons
    assert "no '####' marker" in reasons


def test_duplicate_ids_are_quarantined(tmp_path):
    rows = [{"id": "a", "question": "q1", "reference": "1"}, {"id": "a", "question": "q2", "reference": "2"}]
    path = tmp_path / "b.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = BenchmarkConfig(source="parquet", path=str(path), splits={"train": str(path), "eval": str(path)})
    items, quarantine = load_items(cfg, seed=0)
    # The eval split reads the same file: every later "a" is a duplicate.
    assert items.num_rows == 1 and quarantine.num_rows == 3
    assert all("duplicate id 'a'" in r for r in quarantine["reason"].to_pylist())


def test_mmlu_and_arc_formats_map_to_letters(tmp_path):
    mmlu = tmp_path / "mmlu.parquet"
    pq.write_table(pa.Table.from_pylist([{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 2}]), mmlu)
    cfg = BenchmarkConfig(source="parquet", kind="choice", path=str(mmlu), splits={"train": str(mmlu), "eval": str(mmlu)},
                          columns={"reference": "answer"}, n_eval=1)
    items, quarantine = load_items(cfg, seed=0)
    assert items["reference"].to_pylist() == ["C", "C"] and items["choices"][0].as_py() == ["a", "b", "c", "d"]
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"id": "x", "question": "q", "choices": {"text": ["p", "q"], "label": ["A", "B"]}, "answerKey": "B"}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="choice", path=str(arc), splits={"train": str(arc)}, columns={"reference": "answerKey"})
    items, _ = load_items(cfg.model_copy(update={"splits": {"train": str(arc), "eval": str(arc)}}), seed=0)
    assert items["reference"][0].as_py() == "B" and items["choices"][0].as_py() == ["p", "q"]


def test_unreadable_parquet_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    cfg = BenchmarkConfig(source="parquet", path=str(bad), splits={"train": str(bad), "eval": str(bad)})
    with pytest.raises(BenchmarkError, match="is not readable Parquet"):
        load_items(cfg, seed=0)


def test_math500_format(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"problem": "What is $\\frac{1}{2}+\\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}", "subject": "Algebra",
             "level": 1, "unique_id": "test/algebra/1.json"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="math", name="math500", path=str(path), splits={"train": str(path), "eval": str(path)},
                          columns={"id": "unique_id", "question": "problem", "reference": "answer"})
    items, quarantine = load_items(cfg, seed=0)
    # The same file as both splits: the second copy of the id is quarantined, not silently dropped.
    assert items.to_pylist()[0]["reference"] == "\\frac{3}{4}" and items["kind"][0].as_py() == "math"
    assert quarantine.num_rows == 1 and "duplicate id" in quarantine["reason"][0].as_py()


# --- the real datasets' formats, from small fixture files in tests/data (JSONL and Parquet) ---------
DATA = __import__("pathlib").Path(__file__).resolve().parents[1] / "data"
FORMATS = {
    # name: (kind, train file, eval file, column mapping, reference_after, expected eval references)
    "gsm8k": ("numeric", "gsm8k_train", "gsm8k_test", {"reference": "answer"}, "####", ["18", "3"]),
    "math500": ("math", "math_train", "math500_test", {"id": "unique_id", "question": "problem", "reference": "answer"}, None,
                ["\\frac{3}{4}", "1, 2", "(-\\infty,3]"]),
    "arc": ("choice", "arc_train", "arc_test", {"reference": "answerKey"}, None, ["A", "A", "A"]),
    "mmlu": ("choice", "mmlu_train", "mmlu_test", {"reference": "answer"}, None, ["B", "C"]),
}


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_real_dataset_formats_load_train_from_train_and_eval_from_test(name, ext):
    kind, train, test, columns, after, refs = FORMATS[name]
    cfg = BenchmarkConfig(source=ext, kind=kind, name=name, path=str(DATA), columns=columns, reference_after=after,
                          splits={"train": str(DATA / f"{train}.{ext}"), "eval": str(DATA / f"{test}.{ext}")})
    items, quarantine = load_items(cfg, seed=0)
    assert quarantine.num_rows == 0, quarantine.to_pylist()
    evaluation = items.filter(pc.equal(items["split"], "eval"))
    assert evaluation["reference"].to_pylist() == refs
    train_questions = set(items.filter(pc.equal(items["split"], "train"))["question"].to_pylist())
    assert train_questions and not train_questions & set(evaluation["question"].to_pylist())
    assert set(items["kind"].to_pylist()) == {kind}


def test_gsm8k_reference_is_the_number_after_the_marker():
    cfg = BenchmarkConfig(source="jsonl", name="gsm8k", path=str(DATA), columns={"reference": "answer"}, reference_after="####",
                          splits={"train": str(DATA / "gsm8k_train.jsonl"), "eval": str(DATA / "gsm8k_test.jsonl")})
    items, _ = load_items(cfg, seed=0)
    assert items["reference"].to_pylist()[:3] == ["72", "10", "1,450"]


def test_arc_digit_labels_and_five_options_map_to_letters():
    cfg = BenchmarkConfig(source="parquet", kind="choice", name="arc", path=str(DATA), columns={"reference": "answerKey"},
                          splits={"train": str(DATA / "arc_train.parquet"), "eval": str(DATA / "arc_test.parquet")})
    items = {r["id"]: r for r in load_items(cfg, seed=0)[0].to_pylist()}
    assert items["NYSEDREGENTS_2015_4_1"]["reference"] == "B"  # answerKey "2" of labels 1-4
    assert items["MCAS_2000_4_6"]["choices"][0] == "cellular telephone" and items["MCAS_2000_4_6"]["reference"] == "A"
    assert len(items["ACTAAP_2007_7_13"]["choices"]) == 5


def test_arc_key_not_among_labels_is_quarantined(tmp_path):
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps({"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["1", "2"]}, "answerKey": "C"}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="choice", path=str(path), columns={"reference": "answerKey"},
                          splits={"train": str(path), "eval": str(path)})
    items, quarantine = load_items(cfg, seed=0)
    assert items.num_rows == 0 and "answer key 'C' is not one of the labels ['1', '2']" in quarantine["reason"][0].as_py()


def test_mmlu_answer_index_out_of_range_is_quarantined(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}) + "\n")
    cfg = BenchmarkConfig(source="jsonl", kind="choice", path=str(path), columns={"reference": "answer"},
                          splits={"train": str(path), "eval": str(path)})
    _, quarantine = load_items(cfg, seed=0)
    assert "answer index 4 out of range for 4 options" in quarantine["reason"][0].as_py()


def test_huggingface_loader_reads_the_hub_layout_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = BenchmarkConfig(source="huggingface", name="gsm8k", path=str(DATA / "hf_gsm8k"), subset="main",
                          columns={"reference": "answer"}, reference_after="####")
    items, quarantine = load_items(cfg, seed=0)
    assert quarantine.num_rows == 0
    assert items.filter(pc.equal(items["split"], "eval"))["reference"].to_pylist() == ["18", "3"]
    assert items.filter(pc.equal(items["split"], "train")).num_rows == 3


def test_parquet_fixtures_are_the_jsonl_fixtures():
    import pyarrow.json as pj

    for path in sorted(DATA.glob("*.jsonl")):
        if path.name == "gsm8k_answers.jsonl":
            continue
        assert pq.read_table(path.with_suffix(".parquet")).equals(pj.read_json(path)), path.name
