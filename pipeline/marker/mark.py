"""The exam marker: right or wrong against the reference, nothing else.

`mark_table` is a pure function over a pyarrow table of `answers` rows that returns `marked` rows:
every answers column plus `correct`, `extracted` (the final answer read, or null), `reason` and
`marked_by`. It judges only the stated final answer against the reference; it never scores
quality, style or reasoning. `mark_dataset` wraps it in a stateless Ray Data map over batches.

Reasons: `error` (inference failed), `no_answer` (empty, or nothing parseable), `truncated` (cut by
the token limit before a final answer), `match`, `mismatch` (also: several different answers).
`marked_by` is `rules`, or `math-verify` for math rows its equivalence check decided. `grade_table`
also returns `undecided` (a non-empty answer with nothing parseable, a math-verify timeout): the only
rows the optional supervisory LLM (lossaverse.pipeline.marker.judge) may be asked about.

The reading rules live in lossaverse.pipeline.marker.marktext (text preparation, `numeric`, `choice`, `exact`) and
lossaverse.pipeline.marker.markmath (`math`: sets decided from the reference, math-verify within the row's budget).
Every row first loses what is not its answer (`marktext.prepare`): text after a chat control token
(`<|im_end|>`, `<|im_start|>user`) or a new question the model writes itself, and a reasoning trace
(`<think>...</think>`); cut by the token limit inside an unclosed trace, it is `truncated`.

Speed: `numeric` rows in the commonest shapes are decided for the whole batch at once by
pyarrow.compute (`fast_numeric`), only where the per-row rules provably give the same verdict; the
rest go through `grade_row`. tests/unit/test_mark_fast.py checks the two agree row for row.

How a careful human grader reads an answer, as rules (the same for every kind):
- The text from a new question the model starts on its own ("\\nQuestion: ...") is not part of
  the answer; LaTeX and markdown decorations (`**`, `\\dfrac`, `\\text{}`, `\\$`) are read through.
- A *stated* final answer (`#### X`, `\\boxed{X}`, "the answer is X", "Answer: X", Minerva's
  "Final Answer: The final answer is $X$.") wins over any number in the reasoning; of several
  statements the last one counts (a self-correction), and a "Final Answer:" line overrides the
  boxes before it (boxed intermediate results), but
  stating three or more different answers (two for `choice` and `exact`, whose answer spaces are
  small enough that hedging pays) is guessing and is wrong. "The answer is 3 or 4" is wrong.
- Without a statement the answer is guessed from the text: the last number (`numeric`), the one
  option letter mentioned (`choice`), the last line (`exact`). Numbers inside questions, negated
  numbers ("not 5") and a number ending a list of different numbers ("0 1 2 ... 100") are no answer.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.pipeline.data.kinds import kind_of
from lossaverse.pipeline.data.schemas import ANSWERS, MARKED, check
from lossaverse.pipeline.marker.judge import judge_dataset
from lossaverse.pipeline.marker.markchoice import read_choice
from lossaverse.pipeline.marker.markmath import read_math
from lossaverse.pipeline.marker.marktext import (  # noqa: F401 - cut_new_turn, to_number: this module's interface too (tests)
    ASCII_SPACE,
    READ_CHARS,
    Reading,
    cut_new_turn,
    prepare,
    read_exact,
    read_number,
    to_number,
)


class Verdict(NamedTuple):
    correct: bool
    extracted: str | None
    reason: str
    marked_by: str


class Graded(NamedTuple):
    """A verdict plus `undecided`: True for rows the supervisory LLM may be asked about."""

    correct: bool
    extracted: str | None
    reason: str
    marked_by: str
    undecided: bool


def grade_numeric(completion: str, reference: str, choices=None, question=None, timeout_s: float = 5) -> Reading:
    return read_number(completion, reference, question)


def grade_math(completion: str, reference: str, choices=None, question=None, timeout_s: float = 5) -> Reading:
    return read_math(completion, reference, timeout_s, question)


def grade_choice(completion: str, reference: str, choices=None, question=None, timeout_s: float = 5) -> Reading:
    return read_choice(completion, reference, choices, question)


def grade_exact(completion: str, reference: str, choices=None, question=None, timeout_s: float = 5) -> Reading:
    return read_exact(completion, reference)


@functools.cache
def _resolve(name: str) -> Callable[..., Reading]:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def grader_for(kind: str) -> Callable[..., Reading]:
    """The grader the registry (lossaverse.pipeline.data.kinds) names for `kind`; ValueError for an unknown kind."""
    return _resolve(kind_of(kind).grader)


def grade_row(completion, reference: str, kind: str, choices=None, finish_reason: str | None = None,
              error: str | None = None, timeout_s: float = 5, question: str | None = None) -> Graded:
    """One verdict with its `undecided` flag. Pure: the same inputs always give the same result.
    `timeout_s`: the row's time budget for math-verify, in any thread (lossaverse.pipeline.marker.markmath.budget)."""
    grader = grader_for(kind)
    if error:
        return Graded(False, None, "error", "rules", False)
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion).decode("utf-8", "replace")
    if not completion or not completion.strip():
        return Graded(False, None, "no_answer", "rules", False)
    text, in_trace = prepare(completion)
    if finish_reason == "length" and in_trace:
        # Cut inside the reasoning trace: a box there is a tentative answer, not the final one.
        return Graded(False, None, "truncated", "rules", False)
    if not text.strip():
        return Graded(False, None, "no_answer", "rules", False)
    r = grader(text, reference or "", choices, question, timeout_s)
    if finish_reason == "length" and not r.stated:
        # Cut by the token limit before a final answer: a number mid-reasoning is not an answer.
        return Graded(False, None, "truncated", "rules", False)
    if r.extracted is None:
        return Graded(False, None, "no_answer", "rules", True)
    return Graded(r.correct, r.extracted, "match" if r.correct else "mismatch", r.marked_by, r.undecided)


def mark_row(completion, reference: str, kind: str, choices=None, finish_reason: str | None = None,
             error: str | None = None, timeout_s: float = 5, question: str | None = None) -> Verdict:
    """One verdict (`correct`, `extracted`, `reason`, `marked_by`)."""
    return Verdict(*grade_row(completion, reference, kind, choices, finish_reason, error, timeout_s, question)[:4])


# --- the vectorised path for `numeric` rows -------------------------------------------------
# Rows in the commonest shapes are decided by pyarrow.compute over the whole batch; every other row
# goes through `grade_row`. A row is taken only when the rules above provably give the same
# verdict: no text the cleaning would change, no new turn, exactly one statement at the very end
# ("... The answer is 72." / "#### 72") or none and a last "= 72"; plain numbers of at most 15
# significant digits on both sides, so float64 equality is exact decimal equality.
_ANSWER_CI = r"[Aa][Nn][Ss][Ww][Ee][Rr]"
# MARKER under RE2 (case classes instead of the IGNORECASE flag: RE2's folding is Unicode's).
_FINAL_CI = r"[Ff][Ii][Nn][Aa][Ll]"
MARKER_RE2 = (
    r"####|\\[Bb][Oo][Xx][Ee][Dd]\{|\b(?:" + _FINAL_CI + ASCII_SPACE + r"+)?" + _ANSWER_CI + ASCII_SPACE + r"*(?:[Ii][Ss]|:|=)"
    r"(?:" + ASCII_SPACE + r"*(?:[Tt][Hh][Ee]" + ASCII_SPACE + r"+)?(?:" + _FINAL_CI + ASCII_SPACE + r"+)?" + _ANSWER_CI + ASCII_SPACE + r"+[Ii][Ss]\b)?"
)
_FAST_NUM = r"(?P<n>-?\$?(?:\d{1,3}(?:,\d{3}){1,2}|\d{1,9})(?:\.\d{1,6})?)[ \t]*\.?[ \t]*\n?$"
_FAST_STATED = r"(?s).(?:####|\b" + _ANSWER_CI + r" [Ii][Ss]|\b" + _ANSWER_CI + r":)[ \t]*" + _FAST_NUM
_FAST_LAST = r"[^!<>=]=[ \t]*" + _FAST_NUM
# A comma after a leading 0 is a decimal comma (`reference_text`): "0,111" is not taken.
_FAST_REF = r"^-?\$?(?:[1-9]\d{0,2}(?:,\d{3}){1,2}|\d{1,9})(?:\.\d{1,6})?$"
# Text that `clean` would change, a new turn that `cut_new_turn` would cut, or a chat or reasoning
# tag that `prepare` would cut at.
_FAST_UNSAFE = (
    r"[\\{\x{2212}\x{00a0}\x{2009}\x{202f}]|\*\*|\n" + ASCII_SPACE + r"*(?:(?:Question|Q)" + ASCII_SPACE + r"*:|(?:user|assistant|system)[ \t]*\n)"
    r"|<(?:\||/?think>|/s>|end_of_turn>|start_of_turn>)"
)


def _as_float(strings: pa.Array) -> pa.Array:
    plain = pc.replace_substring(pc.replace_substring(strings, "$", ""), ",", "")
    return pc.cast(plain, pa.float64())


def fast_numeric(table: pa.Table) -> tuple[np.ndarray, pa.Array, pa.Array, pa.Array]:
    """(taken, correct, extracted, reason) for the rows the vectorised path decides; rows not taken
    hold placeholder values."""
    table = pa.table({name: table[name].combine_chunks() for name in ("completion", "error", "kind", "reference", "finish_reason")})
    comp = pc.fill_null(table["completion"], "")
    error = table["error"]
    has_error = pc.fill_null(pc.greater(pc.utf8_length(error), 0), False)
    numeric = pc.fill_null(pc.equal(table["kind"], "numeric"), False)
    empty = pc.invert(pc.match_substring_regex(comp, r"[^ \t\n\r\f\v]"))
    # Longer answers are read on their head and tail (`prepare`).
    unsafe = pc.or_(pc.match_substring_regex(comp, _FAST_UNSAFE), pc.greater(pc.utf8_length(comp), 2 * READ_CHARS))
    # A comma between digits against a reference with a decimal point: `decimal_commas` decides.
    decimal = pc.and_(pc.match_substring_regex(comp, r"\d,\d"), pc.match_substring(pc.fill_null(table["reference"], ""), "."))
    unsafe = pc.or_(unsafe, decimal)
    markers = pc.count_substring_regex(comp, MARKER_RE2)
    stated = pc.struct_field(pc.extract_regex(comp, _FAST_STATED), "n")
    last = pc.struct_field(pc.extract_regex(comp, _FAST_LAST), "n")
    safe = pc.invert(unsafe)
    unstated = pc.and_(safe, pc.equal(markers, 0))
    use_stated = pc.fill_null(pc.and_(pc.and_(safe, pc.equal(markers, 1)), pc.is_valid(stated)), False)
    use_last = pc.fill_null(pc.and_(unstated, pc.is_valid(last)), False)
    ref = pc.utf8_trim(pc.fill_null(table["reference"], ""), " \t\n\r")
    ref_ok = pc.match_substring_regex(ref, _FAST_REF)
    cut = pc.equal(pc.fill_null(table["finish_reason"], ""), "length")
    extracted = pc.if_else(use_stated, stated, last)
    equal = pc.fill_null(pc.equal(_as_float(pc.fill_null(extracted, "0")), _as_float(pc.if_else(ref_ok, ref, "0"))), False)
    read = pc.and_(ref_ok, pc.or_(use_stated, use_last))
    # Cut with no statement at all: truncated, whatever the text (see grade_row).
    truncated = pc.and_(pc.and_(unstated, cut), pc.match_substring_regex(comp, r"[0-9A-Za-z]"))
    taken = pc.and_(numeric, pc.or_(has_error, pc.or_(empty, pc.or_(read, truncated))))
    correct = pc.and_(pc.and_(read, pc.invert(truncated)), equal)
    correct = pc.and_(correct, pc.invert(pc.or_(has_error, empty)))
    reason = pc.if_else(correct, "match", "mismatch")
    reason = pc.if_else(truncated, "truncated", reason)
    reason = pc.if_else(empty, "no_answer", reason)
    reason = pc.if_else(has_error, "error", reason)
    blank = pc.or_(has_error, pc.or_(empty, truncated))
    extracted = pc.if_else(blank, pa.scalar(None, pa.string()), extracted)
    return taken.combine_chunks().to_numpy(zero_copy_only=False), correct.combine_chunks(), extracted.combine_chunks(), reason.combine_chunks()


def grade_table(table: pa.Table, timeout_s: float = 5) -> pa.Table:
    """answers rows -> marked rows plus a bool `undecided` column (for the supervisory LLM)."""
    table = check(table, ANSWERS, "mark input")
    taken, correct, extracted, reason = fast_numeric(table)
    rest = np.flatnonzero(~taken)
    names = ["completion", "reference", "kind", "choices", "finish_reason", "error", "question"]
    cols = table.take(pa.array(rest, pa.int64())).select(names).to_pydict()
    graded = [grade_row(c, r, k, ch, f, e, timeout_s, q) for c, r, k, ch, f, e, q in zip(*(cols[n] for n in names))]
    fields = list(zip(*graded)) if graded else [[]] * 5
    mask = pa.array(~taken)
    n = table.num_rows
    out = {
        "correct": pc.replace_with_mask(correct, mask, pa.array(fields[0], pa.bool_())),
        "extracted": pc.replace_with_mask(extracted, mask, pa.array(fields[1], pa.string())),
        "reason": pc.replace_with_mask(reason, mask, pa.array(fields[2], pa.string())),
        "marked_by": pc.replace_with_mask(pa.repeat(pa.scalar("rules"), n), mask, pa.array(fields[3], pa.string())),
        "undecided": pc.replace_with_mask(pa.array(np.zeros(n, dtype=bool)), mask, pa.array(fields[4], pa.bool_())),
    }
    for name, values in out.items():
        table = table.append_column(name, values)
    return table


def mark_table(table: pa.Table, timeout_s: float = 5) -> pa.Table:
    """answers rows -> marked rows (same rows, same order, four columns added)."""
    return check(grade_table(table, timeout_s), MARKED, "mark output")


def mark_dataset(ds, batch_size: int, timeout_s: float = 5, judge=None):
    """The stateless Ray Data stage: a map over pyarrow batches; with a `judge` config (enabled),
    the rows the rules cannot decide are then put to the supervisory LLM (lossaverse.pipeline.marker.judge)."""
    if judge is None or not judge.enabled:
        return ds.map_batches(mark_table, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"timeout_s": timeout_s})

    graded = ds.map_batches(grade_table, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"timeout_s": timeout_s})
    return judge_dataset(graded, judge)
