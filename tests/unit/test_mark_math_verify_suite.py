"""The marker on math-verify's own regression suite: its tests/ cases as rows
(the package data pipeline/marker/suites/math_verify_cases.jsonl, made by tests/data/marker/make_math_verify_cases.py), less the cases
whose expectation is math-verify's parser configuration rather than the answer's correctness."""

import json

import pytest

from lossaverse.pipeline.bench.markbench import MATH_VERIFY_SUITE
from lossaverse.pipeline.marker.mark import grade_row

# What make_math_verify_cases.py writes from Math-Verify 5d148cfa: 277 cases, 17 of them excluded.
ROWS, EXCLUDED = 277, 17
AGREEMENT = 0.97


def _rows() -> list[dict]:
    return [json.loads(line) for line in MATH_VERIFY_SUITE.read_text().splitlines() if line.strip()]


def test_the_suite_holds_every_case_and_says_why_each_excluded_one_is():
    rows = _rows()
    excluded = [r for r in rows if r["excluded"] is not None]
    assert (len(rows), len(excluded)) == (ROWS, EXCLUDED)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(r["excluded"].strip() and r["source"].startswith("math-verify tests/") for r in excluded)
    # `correct` departs from math-verify's expectation only where the row's note says why
    assert all(r["note"] for r in rows if r["correct"] != bool(r["expected"]))


def test_the_marker_agrees_with_math_verify_suite_and_marks_no_wrong_answer_right():
    rows = [r for r in _rows() if r["excluded"] is None]
    verdicts = {r["id"]: grade_row(r["completion"], r["reference"], r["kind"], r["choices"], r["finish_reason"]).correct for r in rows}
    false_positives = [r["id"] for r in rows if verdicts[r["id"]] and not r["correct"]]
    disagreeing = [r["id"] for r in rows if verdicts[r["id"]] != r["correct"]]
    assert false_positives == []
    assert 1 - len(disagreeing) / len(rows) >= AGREEMENT, disagreeing


@pytest.mark.parametrize(
    "kind,completion,reference,correct",
    [
        # a reference written as a worked solution: its final answer
        ("math", "A total loss of $\\boxed{28\\%}$.", "So it is $28 \\%$.\nFinal Answer: The final answer is $28 \\%$. I hope it is right.", True),
        ("math", "$\\boxed{-2}$ and $\\boxed{1}$", "the solutions are $n = \\boxed{1,-2}.$", True),
        ("math", "$\\boxed{-2}$ and $\\boxed{3}$", "the solutions are $n = \\boxed{1,-2}.$", False),
        # a reference listing its values with "or"
        ("math", "$\\boxed{21,16,11}$", "$21,16$ or $11$", True),
        # boxes joined by prose that is no conjunction are not one answer
        ("math", "First $\\boxed{1}$ no no no $\\boxed{2}$.", "1, 2", False),
        # a long decimal of a fraction whose decimal does not end; never of one that ends
        ("math", "$\\boxed{0.0833333}$", "\\frac{1}{12}", True),
        ("math", "$\\boxed{0.0833}$", "\\frac{1}{12}", False),
        ("math", "$\\boxed{2.5000001}$", "2.5", False),
        # "32, 349" is two numbers
        ("math", "is $\\boxed{32, 349}$", "32349", False),
        ("math", "is $\\boxed{32,\\! 349}$", "32349", True),
        # a number inside an expression is not the answer
        ("numeric", "$\\frac{1+\\sqrt{5}}{2}$", "2", False),
        ("numeric", "$\\frac{1+\\sqrt{5}}{2}$", "1", False),
        ("numeric", "$x\\approx11$", "11", True),
        ("numeric", "$\\frac3{3} $", "1", True),
        # boxed intermediate results, then the final answer
        ("numeric", "First $\\boxed{200}$, then $\\boxed{255}$.\nFinal Answer: The final answer is $10,455$.", "10455", True),
        # a decimal comma in the reference
        ("numeric", "1.22", "1,22", True),
        ("numeric", "122", "1,22", False),
        ("numeric", "$$\\boxed{667}$$", "$$667$$", True),
    ],
)
def test_rules_the_suite_asked_for(kind, completion, reference, correct):
    g = grade_row(completion, reference, kind)
    assert g.correct == correct, g.extracted
