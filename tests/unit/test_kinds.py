"""The benchmark kinds: one registry (lossaverse.pipeline.data.kinds) behind the config, the prompt
templates, the reference completions and the marker's graders. Adding a kind is one `register`
and its grader function: the toy kind below is registered here and nowhere else."""

import re

import pyarrow as pa
import pytest

from lossaverse.cluster.config import ConfigError, load_config
from lossaverse.pipeline.data.build import build_datasets
from lossaverse.pipeline.data.kinds import KINDS, Kind, register
from lossaverse.pipeline.data.prompts import render, template_for
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.marker.mark import Reading, grade_row, grader_for, mark_table
from tests.conftest import ROOT

ITEM = {"question": "What is 6 * 7?", "choices": ["41", "42"]}
REFERENCES = {"numeric": "42", "math": "42", "choice": "B", "exact": "42"}


def test_every_kind_has_a_template_a_reference_form_and_a_grader():
    assert set(KINDS) == set(REFERENCES)
    for kind in KINDS.values():
        assert callable(grader_for(kind.name)) and kind.template and "{reference}" in kind.reference_form


def grade_yesno(text: str, reference: str, choices=None, question=None, timeout_s: float = 5) -> Reading:
    """The toy kind's grader: the last yes or no in the answer."""
    said = re.findall(r"\b(yes|no)\b", text.lower())
    extracted = said[-1] if said else None
    return Reading(extracted, extracted == reference.lower(), bool(said))


def test_a_toy_kind_is_one_registry_entry_and_its_grader(monkeypatch):
    """Register a kind; then the config accepts it, a prompt renders in its template, its rows are
    marked by its grader, and a dataset builds with its reference form."""
    monkeypatch.setattr("lossaverse.pipeline.data.kinds.KINDS", dict(KINDS))  # the toy kind leaves with the test
    register(Kind("yesno", "Question: {question}\nAnswer yes or no.\nAnswer:", " The answer is {reference}.",
                  f"{__name__}:grade_yesno", "the last yes or no"))
    with pytest.raises(ValueError, match="'yesno' is already registered"):
        register(Kind("yesno", "", "", f"{__name__}:grade_yesno"))

    assert load_config(ROOT / "configs" / "tiny.yaml", ["benchmark.kind=yesno"]).benchmark.kind == "yesno"
    prompt = render({"question": "Is 7 prime?", "kind": "yesno"}, template_for("yesno"))
    assert prompt == "Question: Is 7 prime?\nAnswer yes or no.\nAnswer:"

    base = dict(id="q1", question="Is 7 prime?", reference="yes", kind="yesno", choices=None, split="train",
                source="toy", model="m", prompt=prompt, finish_reason="stop", completion_tokens=4, error=None)
    rows = [dict(base, competitor="large", sample=0, completion=" No wait, yes."),
            dict(base, competitor="small", sample=0, completion=" No."),
            dict(base, id="q2", question="Is 8 prime?", reference="no", competitor="large", sample=0,
                 completion=" Yes."),
            dict(base, id="q2", question="Is 8 prime?", reference="no", competitor="small", sample=0,
                 completion=" Maybe.")]
    marked = mark_table(pa.Table.from_pylist(rows, schema=ANSWERS))
    assert marked["correct"].to_pylist() == [True, False, False, False]
    assert marked["extracted"].to_pylist() == ["yes", "no", "yes", None]
    assert marked["reason"].to_pylist() == ["match", "mismatch", "mismatch", "no_answer"]

    built = build_datasets(marked, with_reference=True)
    kto = built["kto"].to_pylist()
    assert [(r["id"], r["competitor"], r["label"]) for r in kto] == [
        ("q1", "large", True), ("q1", "small", False), ("q2", "large", False), ("q2", "small", False),
        ("q2", "reference", True)]
    assert kto[-1]["completion"] == " The answer is no."  # nobody got q2 right: its reference, in the kind's form


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kinds_reference_stated_in_its_own_form_is_marked_right(kind):
    """The form a kind's reference takes as a training completion is the one its grader reads."""
    completion = KINDS[kind].reference_form.format(reference=REFERENCES[kind])
    assert grade_row(completion, REFERENCES[kind], kind, choices=ITEM["choices"]).correct
    prompt = render({**ITEM, "kind": kind}, template_for(kind))
    assert prompt.startswith("Question: What is 6 * 7?") and prompt.endswith("Answer:")


def test_an_unknown_kind_is_refused_naming_the_registered_ones():
    with pytest.raises(ConfigError, match=r"benchmark.kind: unknown benchmark kind 'essay'; valid: \['choice', 'exact', 'math', 'numeric'\]"):
        load_config(ROOT / "configs" / "tiny.yaml", ["benchmark.kind=essay"])
    with pytest.raises(ValueError, match="unknown benchmark kind 'essay'"):
        template_for("essay")
    with pytest.raises(ValueError, match="unknown benchmark kind 'essay'"):
        grade_row("The answer is 1.", "1", "essay")
    with pytest.raises(ValueError, match=r"grader 'nowhere' is not \"module:function\""):
        register(Kind("essay", "", "", "nowhere"))
