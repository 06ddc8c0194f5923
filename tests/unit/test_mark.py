import pyarrow as pa
import pytest

from pipeline.mark import extract_numeric, mark_row, mark_table, to_number
from pipeline.schemas import ANSWERS, MARKED


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7. The answer is 7.", ("7", "strict")),
        ("so #### 1,000", ("1,000", "strict")),
        ("first 12 then 15", ("15", "flexible")),
        ("The answer is $5.50.", ("$5.50", "strict")),
        ("\\boxed{3/4}", ("3/4", "strict")),
        ("no digits here", (None, "")),
    ],
)
def test_extract_numeric(text, expected):
    assert extract_numeric(text) == expected


@pytest.mark.parametrize("a,b", [("1,000", "1000"), ("0.50", ".5"), ("$12.", "12"), ("50%", "50"), ("6/8", "0.75")])
def test_numbers_compare_as_numbers(a, b):
    assert to_number(a) == to_number(b)


def test_strict_form_beats_a_later_number():
    # "The answer is 7" is the stated final answer even though 9 comes later.
    v = mark_row("The answer is 7. (9 was a typo)", "7", "numeric")
    assert v.correct and v.extracted == "7" and v.reason == "match"


def test_wrong_number_is_a_mismatch():
    assert mark_row("The answer is 8.", "7", "numeric")[:3] == (False, "8", "mismatch")


def test_reasons_for_unanswerable_rows():
    assert mark_row("", "7", "numeric").reason == "no_answer"
    assert mark_row("I think so", "7", "numeric", finish_reason="stop").reason == "no_answer"
    assert mark_row("Let me think about", "7", "numeric", finish_reason="length").reason == "truncated"
    assert mark_row("", "7", "numeric", error="context too long").reason == "error"


def test_choice_with_several_letters_is_wrong():
    assert not mark_row("A or C", "A", "choice", ["x", "y", "z"]).correct
    assert mark_row("The answer is (C)", "C", "choice", ["x", "y", "z"]).correct


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="valid: \\['choice', 'exact', 'math', 'numeric'\\]"):
        mark_row("1", "1", "essay")


def test_mark_table_keeps_every_row_and_adds_verdicts():
    rows = []
    for i, (completion, error) in enumerate([(" The answer is 4.", None), (" The answer is 5.", None), ("", "boom")]):
        rows.append(
            dict(id=f"q{i}", question="2+2?", reference="4", kind="numeric", choices=None, split="train", source="t",
                 competitor="large", model="m", sample=0, prompt="p", completion=completion, finish_reason="stop",
                 completion_tokens=3, error=error)
        )
    out = mark_table(pa.Table.from_pylist(rows, schema=ANSWERS))
    assert out.schema == MARKED
    assert out["id"].to_pylist() == ["q0", "q1", "q2"]
    assert out["correct"].to_pylist() == [True, False, False]
    assert out["reason"].to_pylist() == ["match", "mismatch", "error"]


def test_number_mid_reasoning_in_a_cut_answer_is_truncated_not_a_guess():
    assert mark_row("First 12 + 30 gives", "42", "numeric", finish_reason="length").reason == "truncated"
    # A stated final answer before the cut still counts.
    assert mark_row("The answer is 42. Also", "42", "numeric", finish_reason="length").correct
    # Without the cut, the last number is read (flexible extraction).
    assert mark_row("12 + 30 = 42", "42", "numeric", finish_reason="stop").correct
