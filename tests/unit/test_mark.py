import time

import pyarrow as pa
import pytest

from lossaverse.pipeline.data.schemas import ANSWERS, MARKED
from lossaverse.pipeline.marker.mark import grade_row, mark_row, mark_table, read_number, to_number


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 + 4 = 7. The answer is 7.", ("7", True)),
        ("so #### 1,000", ("1,000", True)),
        ("first 12 then 15", ("15", False)),
        ("The answer is $5.50.", ("$5.50", True)),
        ("\\boxed{3/4}", ("3/4", True)),
        ("Answer: 16 - 3 = 13.", ("13", True)),
        ("no digits here", (None, False)),
    ],
)
def test_read_number_gives_the_stated_or_last_number(text, expected):
    r = read_number(text, "0")
    assert (r.extracted, r.stated) == expected


@pytest.mark.parametrize("a,b", [("1,000", "1000"), ("0.50", ".5"), ("$12.", "12"), ("50%", "50"), ("6/8", "0.75")])
def test_numbers_compare_as_numbers(a, b):
    assert to_number(a) == to_number(b)


def test_reasons_for_unanswerable_rows():
    assert mark_row("", "7", "numeric").reason == "no_answer"
    assert mark_row("I think so", "7", "numeric", finish_reason="stop").reason == "no_answer"
    assert mark_row("Let me think about", "7", "numeric", finish_reason="length").reason == "truncated"
    assert mark_row("", "7", "numeric", error="context too long").reason == "error"


def test_only_a_non_empty_answer_without_a_reading_is_undecided():
    assert grade_row("I think so", "7", "numeric").undecided
    assert not grade_row("", "7", "numeric").undecided
    assert not grade_row("The answer is 8.", "7", "numeric").undecided
    assert not grade_row("Let me think about", "7", "numeric", finish_reason="length").undecided


def test_unknown_kind_lists_valid():
    with pytest.raises(ValueError, match="valid: \\['choice', 'exact', 'math', 'numeric'\\]"):
        mark_row("1", "1", "essay")


def test_non_utf8_bytes_are_read_with_replacement_characters():
    v = mark_row(b"The answer is 7\xff\xfe.", "7", "numeric")
    assert v.correct and v.extracted == "7"
    # A lone surrogate (bytes decoded with surrogateescape) never reaches the stored `extracted`.
    assert mark_row("Answer: Par\udcffis", "Paris", "exact").extracted == "Par?is"


def test_a_one_megabyte_answer_is_marked_in_well_under_a_second():
    text = "Let me recount the marbles once more. " * 28_000 + "The answer is 42."
    start = time.perf_counter()
    assert mark_row(text, "42", "numeric").correct
    assert time.perf_counter() - start < 1.0


def test_math_verify_timeout_leaves_the_row_undecided_and_wrong():
    start = time.perf_counter()
    g = grade_row("$\\boxed{(x+1)^{200000}}$", "x^2+1", "math", timeout_s=1)
    assert (g.correct, g.reason, g.marked_by, g.undecided) == (False, "mismatch", "math-verify", True)
    assert time.perf_counter() - start < 10


def test_math_fast_path_is_marked_by_rules_and_the_rest_by_math_verify():
    assert mark_row("$\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}", "math").marked_by == "rules"
    assert mark_row("$\\boxed{(x+1)^2}$", "x^2+2x+1", "math")[2:] == ("match", "math-verify")


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
    assert mark_table(ANSWERS.empty_table()).num_rows == 0


def test_number_mid_reasoning_in_a_cut_answer_is_truncated_not_a_guess():
    assert mark_row("First 12 + 30 gives", "42", "numeric", finish_reason="length").reason == "truncated"
    # A stated final answer before the cut still counts.
    assert mark_row("The answer is 42. Also", "42", "numeric", finish_reason="length").correct
    # Without the cut, the last number is read (flexible extraction).
    assert mark_row("12 + 30 = 42", "42", "numeric", finish_reason="stop").correct
