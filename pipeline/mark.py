"""The exam marker: right or wrong against the reference, nothing else.

`mark_table` is a pure function over a pyarrow table of `answers` rows that returns `marked` rows:
every answers column plus `correct`, `extracted` (the final answer read, or null), `reason` and
`marked_by`. It judges only the stated final answer against the reference; it never scores
quality, style or reasoning. `mark_dataset` wraps it in a stateless Ray Data map over batches.

Reasons: `error` (inference failed), `no_answer` (empty, or nothing parseable), `truncated` (cut by
the token limit before a final answer), `match`, `mismatch`.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Callable, NamedTuple

import pyarrow as pa

from pipeline.prompts import LETTERS
from pipeline.schemas import ANSWERS, MARKED, check


class Verdict(NamedTuple):
    correct: bool
    extracted: str | None
    reason: str
    marked_by: str


_NUM = r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?(?:\s*/\s*\d+)?%?"
_NUMBER = re.compile(r"-?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?%?|-?\$?\.\d+%?")
# The stated final-answer forms, strongest first; the last occurrence in the text wins.
_STRICT = [
    re.compile(r"####\s*(" + _NUM + r")"),
    re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}"),
    re.compile(r"answer is[:\s]*(" + _NUM + r")", re.IGNORECASE),
    re.compile(r"answer[:\s]+(" + _NUM + r")", re.IGNORECASE),
]


def to_number(text: str | None) -> Fraction | None:
    """Parse a stated number: `$1,000.`, `.5`, `0.50`, `3/4`, `50%` (the number before %)."""
    if text is None:
        return None
    s = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    if not s or s in {"-", "."}:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den)) if Decimal(den) != 0 else None
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def extract_numeric(text: str) -> tuple[str | None, str]:
    """The final number stated in `text`: (number, 'strict'|'flexible'), or (None, '')."""
    for pattern in _STRICT:
        found = [m for m in pattern.findall(text) if to_number(m) is not None]
        if found:
            return found[-1].strip(), "strict"
    numbers = [m for m in _NUMBER.findall(text) if to_number(m) is not None]
    if numbers:
        return numbers[-1].strip(), "flexible"
    return None, ""


def grade_numeric(completion: str, reference: str, choices) -> tuple[str | None, bool, bool]:
    extracted, how = extract_numeric(completion)
    if extracted is None:
        return None, False, False
    ref = to_number(reference)
    return extracted, ref is not None and to_number(extracted) == ref, how == "strict"


def normalize_text(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def grade_exact(completion: str, reference: str, choices) -> tuple[str | None, bool, bool]:
    lines = [ln for ln in completion.strip().splitlines() if ln.strip()]
    if not lines:
        return None, False, False
    last = lines[-1]
    m = re.search(r"answer is[:\s]*(.+)", last, re.IGNORECASE)
    extracted = (m.group(1) if m else last).strip().rstrip(".")
    return extracted, normalize_text(extracted) == normalize_text(reference), m is not None


def grade_choice(completion: str, reference: str, choices) -> tuple[str | None, bool, bool]:
    """The option letter (or the option's text); several different letters stated is wrong."""
    letters = {m.upper() for m in re.findall(r"(?<![A-Za-z])\(?([A-J])\)?(?![A-Za-z])", completion)}
    options = list(choices or [])
    letters &= set(LETTERS[: len(options)]) if options else letters
    if not letters:
        text = normalize_text(completion)
        hits = {LETTERS[i] for i, c in enumerate(options) if normalize_text(c) and normalize_text(c) in text}
        letters = hits
    if not letters:
        return None, False, False
    if len(letters) > 1:
        return ",".join(sorted(letters)), False, True
    (letter,) = letters
    return letter, letter == reference.strip().upper(), True


def grade_math(completion: str, reference: str, choices) -> tuple[str | None, bool, bool]:
    """Equivalence through math-verify, after a cheap numeric fast path."""
    extracted, how = extract_numeric(completion)
    if extracted is not None and to_number(reference) is not None and to_number(extracted) == to_number(reference):
        return extracted, True, how == "strict"
    from math_verify import parse, verify

    gold = parse(f"${reference}$")
    answer = parse(completion)
    if not answer:
        return extracted, False, False
    return str(answer[-1]), bool(verify(gold, answer)), "\\boxed" in completion or how == "strict"


# A grader returns (extracted, correct, stated): `stated` is True when the answer was given in
# the final-answer form, False when it was only guessed from the text (e.g. the last number).
GRADERS: dict[str, Callable[[str, str, list | None], tuple[str | None, bool, bool]]] = {
    "numeric": grade_numeric,
    "math": grade_math,
    "choice": grade_choice,
    "exact": grade_exact,
}


def mark_row(completion: str | None, reference: str, kind: str, choices=None, finish_reason: str | None = None, error: str | None = None) -> Verdict:
    """One verdict. Pure: the same inputs always give the same verdict."""
    if kind not in GRADERS:
        raise ValueError(f"unknown benchmark kind {kind!r}; valid: {sorted(GRADERS)}")
    marked_by = "math-verify" if kind == "math" else "rules"
    if error:
        return Verdict(False, None, "error", marked_by)
    if not completion or not completion.strip():
        return Verdict(False, None, "no_answer", marked_by)
    extracted, correct, stated = GRADERS[kind](completion, reference, choices)
    if finish_reason == "length" and not stated:
        # Cut by the token limit before a final answer: a number mid-reasoning is not an answer.
        return Verdict(False, None, "truncated", marked_by)
    if extracted is None:
        return Verdict(False, None, "no_answer", marked_by)
    return Verdict(correct, extracted, "match" if correct else "mismatch", marked_by)


def mark_table(table: pa.Table) -> pa.Table:
    """answers rows -> marked rows (same rows, same order, four columns added)."""
    table = check(table, ANSWERS, "mark input")
    cols = table.to_pydict()
    verdicts = [
        mark_row(c, r, k, ch, f, e)
        for c, r, k, ch, f, e in zip(
            cols["completion"], cols["reference"], cols["kind"], cols["choices"], cols["finish_reason"], cols["error"]
        )
    ]
    out = table
    for name, values in zip(Verdict._fields, zip(*verdicts) if verdicts else ([],) * 4):
        out = out.append_column(name, pa.array(list(values), type=MARKED.field(name).type))
    return check(out, MARKED, "mark output")


def mark_dataset(ds, batch_size: int):
    """The stateless Ray Data stage: a map over pyarrow batches."""
    return ds.map_batches(mark_table, batch_format="pyarrow", batch_size=batch_size)
