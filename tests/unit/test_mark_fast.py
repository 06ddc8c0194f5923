"""The vectorised `numeric` path gives exactly the verdicts of the per-row rules."""

import random

import pyarrow as pa
import pytest

from lossaverse.pipeline.bench.markbench import generate_answers_table
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.marker.mark import MARKER_RE2, fast_numeric, grade_row, mark_table
from lossaverse.pipeline.marker.marktext import _MARKER
from tests.unit.test_mark_cases import CASES

FRAGMENTS = [
    "The answer is ", "answer: ", "Answer is ", "ANSWER:", "final answer is ", "#### ", "####", "\\boxed{", "}", "Answer isn't ",
    "5", "-3", "1,000", "1,0000", "$12", "$ 7", "0.5", ".5", "3/4", "3/0", "12.000001", "1234567890123", "42", "7.", "٣",
    " ", " ", ".", ". ", "\n", " = ", "=", "!= ", "<= ", "== ", " or ", ", ", "?", " not ", "**", "\u2212", "\u00a0", "\nQuestion: ",
    "\nQ:", "n't ", " apples", "So ", "x", "é", "ſ", "\t", "%", " to ", "...", "\u2003",
]

# Endings in the shapes the vectorised path takes, so the soup exercises it.
ENDINGS = ["", "", " The answer is 5.", "\n#### 1,000", " = 42", "x = 7.", " answer: $12 ", " = -3.\n", "answer is 0.50"]


def _table(rows: list[tuple]) -> pa.Table:
    return pa.Table.from_pylist(
        [dict(id=f"r{i}", question=q, reference=ref, kind=kind, choices=choices, split="train", source="t", competitor="large",
              model="m", sample=0, prompt="p", completion=comp, finish_reason=finish, completion_tokens=1, error=error)
         for i, (kind, comp, ref, choices, finish, error, q) in enumerate(rows)],
        schema=ANSWERS,
    )


def _fuzz_rows(n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        comp = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(0, 12))) + rng.choice(ENDINGS)
        ref = rng.choice(["5", "-3", "1000", "1,000", "12", "0.5", " 42 ", "7", "3/4", "x", "", "1234567890123", "$12"])
        finish = rng.choice(["stop", "stop", "length", "error"])
        error = rng.choice([None, None, None, "", "boom"])
        rows.append(("numeric", comp, ref, None, finish, error, rng.choice(["q", "So 5 apples."])))
    return rows


def _assert_same_as_rules(table: pa.Table) -> None:
    marked = mark_table(table)
    got = marked.select(["correct", "extracted", "reason", "marked_by"]).to_pylist()
    for row, verdict in zip(table.to_pylist(), got):
        g = grade_row(row["completion"], row["reference"], row["kind"], row["choices"], row["finish_reason"], row["error"], question=row["question"])
        assert tuple(verdict.values()) == tuple(g[:4]), row


def test_table_cases_marked_by_the_table_path_equal_the_row_rules():
    _assert_same_as_rules(_table([(k, c, r, ch, f, e, "q") for _, k, c, r, ch, f, e, _, _ in CASES]))


@pytest.mark.parametrize("kind,rows", [("numeric", 3000), ("math", 300), ("choice", 1500), ("exact", 1500)])
def test_generated_rows_equal_the_row_rules(kind, rows):
    _assert_same_as_rules(generate_answers_table(kind, rows, seed=7))


def test_random_fragment_soup_equals_the_row_rules():
    table = _table(_fuzz_rows(8000, seed=11))
    taken, *_ = fast_numeric(table)
    assert taken.sum() > 2000  # the soup reaches the vectorised path, not only the row rules
    _assert_same_as_rules(table)


def test_vectorised_path_takes_most_generated_numeric_rows():
    taken, *_ = fast_numeric(generate_answers_table("numeric", 2000, seed=3))
    assert taken.mean() > 0.75


def test_statement_marker_counts_the_same_in_python_and_re2():
    import pyarrow.compute as pc

    texts = [c for _, c, *_ in _fuzz_rows(3000, seed=5)] + [c[2] for c in CASES]
    counts = pc.count_substring_regex(pa.array(texts), MARKER_RE2).to_pylist()
    assert counts == [len(_MARKER.findall(t)) for t in texts]


def test_decimal_commas_and_stripped_chat_turns_leave_the_vectorised_path_for_the_rules():
    """Rows the row rules read differently (a decimal comma against a fractional reference, a run-on
    turn whose control tokens the detokenizer dropped) are not decided by the vectorised path."""
    table = _table([("numeric", "The answer is 0,111", "0.111", None, "stop", None, "q"),
                    ("numeric", "The answer is 12.\nuser\nWhat is 2+2?\nassistant\nThe answer is 4", "12", None, "stop", None, "q"),
                    ("numeric", "The answer is 1,000", "1000", None, "stop", None, "q")])
    taken, *_ = fast_numeric(table)
    assert taken.tolist() == [False, False, True]
    assert mark_table(table)["correct"].to_pylist() == [True, True, True]
