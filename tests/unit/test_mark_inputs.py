"""Inputs the marker could never mark right: numeric references it cannot read, and choice items
with more options than letters. Normalised or quarantined at load with a reason; a 400 at /mark."""

import json

import pytest

from lossaverse.cluster.config import BenchmarkConfig
from lossaverse.pipeline.data.prompts import LETTERS, render
from lossaverse.pipeline.marker.mark import grade_row
from lossaverse.pipeline.sources.benchmarks import load_items

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune", "Pluto", "Ceres", "Eris", "Sedna"]


def _load(tmp_path, kind, rows):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "e.jsonl").write_text("")
    cfg = BenchmarkConfig(source="jsonl", kind=kind, path=str(path), splits={"train": str(path), "eval": str(tmp_path / "e.jsonl")})
    return load_items(cfg, seed=0)


def test_numeric_references_are_read_like_answers_and_unreadable_ones_quarantined(tmp_path):
    refs = ["\u22125", "5 dollars", "$1,000", "3:30", "five", "5 - 3", "42"]
    items, quarantine = _load(tmp_path, "numeric", [{"question": f"q{i}", "reference": r} for i, r in enumerate(refs)])
    assert items["reference"].to_pylist() == ["-5", "5", "$1,000", "42"]
    assert items.num_rows + quarantine.num_rows == len(refs)
    reasons = quarantine["reason"].to_pylist()
    assert len(reasons) == 3 and all("not one number the marker can read" in r for r in reasons)
    assert "'3:30'" in reasons[0]


@pytest.mark.parametrize("reference,completion", [("\u22125", "The answer is -5."), ("5 dollars", "The answer is $5."), ("\\$1{,}000", "#### 1000")])
def test_the_marker_reads_a_reference_as_it_reads_an_answer(reference, completion):
    assert grade_row(completion, reference, "numeric").correct


def test_choice_items_with_up_to_26_options_load_render_and_mark(tmp_path):
    items, quarantine = _load(tmp_path, "choice", [
        {"question": "Which is farthest?", "choices": PLANETS[:11], "reference": 10},
        {"question": "Too many", "choices": [f"o{i}" for i in range(27)], "reference": "A"},
        {"question": "Too many, keyed by index", "choices": [f"o{i}" for i in range(27)], "reference": 26},
    ])
    assert items["reference"].to_pylist() == ["K"] and quarantine.num_rows == 2
    assert "27 options, more than the 26 option letters" in quarantine["reason"][0].as_py()
    prompt = render(items.to_pylist()[0], "{question}\n{options}")
    assert "K. Eris" in prompt
    assert grade_row("K", "K", "choice", PLANETS[:11]).correct
    assert grade_row("The answer is (L).", "L", "choice", PLANETS).correct
    assert not grade_row("The answer is (L).", "K", "choice", PLANETS).correct


def test_rendering_more_options_than_letters_says_why():
    with pytest.raises(ValueError, match="27 options, more than the 26 option letters"):
        render({"question": "q", "choices": ["x"] * (len(LETTERS) + 1)}, "{options}")


def test_mark_refuses_more_than_26_options_naming_the_field():
    from lossaverse.serving.http import RequestRejected, validate
    from lossaverse.serving.marker import MarkRequest

    body = {"answers": [{"kind": "choice", "reference": "A", "completion": "A", "choices": [str(i) for i in range(27)]}]}
    with pytest.raises(RequestRejected) as rejected:
        validate(MarkRequest, body)
    assert rejected.value.status == 400 and "choices" in (rejected.value.param or "") + rejected.value.message
    assert "at most 26" in rejected.value.message
    eleven = {"answers": [{"kind": "choice", "reference": "K", "completion": "K", "choices": PLANETS[:11]}]}
    assert validate(MarkRequest, eleven).answers[0].choices == PLANETS[:11]
