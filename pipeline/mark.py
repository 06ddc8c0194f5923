"""The exam marker: right or wrong against the reference, nothing else.

`mark_table` is a pure function over a pyarrow table of `answers` rows that returns `marked` rows:
every answers column plus `correct`, `extracted` (the final answer read, or null), `reason` and
`marked_by`. It judges only the stated final answer against the reference; it never scores
quality, style or reasoning. `mark_dataset` wraps it in a stateless Ray Data map over batches.

Reasons: `error` (inference failed), `no_answer` (empty, or nothing parseable), `truncated` (cut by
the token limit before a final answer), `match`, `mismatch` (also: several different answers).
`marked_by` is `rules`, or `math-verify` for math rows its equivalence check decided. `grade_table`
also returns `undecided` (a non-empty answer with nothing parseable, a math-verify timeout): the only
rows the optional supervisory LLM (pipeline.judge) may be asked about.

Speed: `numeric` rows in the commonest shapes are decided for the whole batch at once by
pyarrow.compute (`fast_numeric`), only where the per-row rules provably give the same verdict; the
rest go through `grade_row`. tests/unit/test_mark_fast.py checks the two agree row for row.

How a careful human grader reads an answer, as rules (the same for every kind):
- The text from a new question the model starts on its own ("\\nQuestion: ...") is not part of
  the answer; LaTeX and markdown decorations (`**`, `\\dfrac`, `\\text{}`, `\\$`) are read through.
- A *stated* final answer (`#### X`, `\\boxed{X}`, "the answer is X", "Answer: X") wins over any
  number in the reasoning; of several statements the last one counts (a self-correction), but
  stating three or more different answers (two for `choice` and `exact`, whose answer spaces are
  small enough that hedging pays) is guessing and is wrong. "The answer is 3 or 4" is wrong.
- Without a statement the answer is guessed from the text: the last number (`numeric`), the one
  option letter mentioned (`choice`), the last line (`exact`). Numbers inside questions, negated
  numbers ("not 5") and a number ending a list of different numbers ("0 1 2 ... 100") are no answer.
"""

from __future__ import annotations

import re
import threading
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.prompts import LETTERS
from pipeline.schemas import ANSWERS, MARKED, check


class Verdict(NamedTuple):
    correct: bool
    extracted: str | None
    reason: str
    marked_by: str


class Reading(NamedTuple):
    """What a grader read from one completion."""

    extracted: str | None  # the final answer read; None: nothing parseable
    correct: bool
    stated: bool  # given in a final-answer form, not guessed from the text
    marked_by: str = "rules"
    undecided: bool = False  # the rules could not decide (math-verify timed out / could not parse)


class Graded(NamedTuple):
    """A verdict plus `undecided`: True for rows the supervisory LLM may be asked about."""

    correct: bool
    extracted: str | None
    reason: str
    marked_by: str
    undecided: bool


MAX_EXTRACTED = 200  # characters of `extracted` kept (an answer, not an essay)

# One number: sign (not a minus between operands), currency, 1,000 / 1000 / 3.14, a fraction
# 3/4, a percent; or a bare decimal .5.
NUMBER = (
    r"(?:(?<![\w)\]}])-)?\$?\s?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?\s?%?"
    r"|(?:(?<![\w)\]}])-)?\$?\.\d+%?"
)
# ASCII semantics throughout (digits, \b, \s, case folding), so that the vectorised path's RE2
# patterns below mean exactly the same.
_NUMBER = re.compile(NUMBER, re.ASCII)
_WS = r"[ \t\n\r\f\v]"
# Where a stated final answer starts.
MARKER = r"####|\\boxed\{|\b(?:final" + _WS + r"+)?answer" + _WS + r"*(?:is|:|=)"
_MARKER = re.compile(MARKER, re.IGNORECASE | re.ASCII)
_FILLER = re.compile(
    r"\s*:?\s*(?:(?:approximately|about|around|roughly|exactly|precisely|just|only|equal to|equals|"
    r"a total of|therefore|thus|then|simply)\s+)*",
    re.IGNORECASE,
)
# A second value right after a stated one: "3 or 4", "3, 4", "3 to 4" (hedging).
_HEDGE = re.compile(r"\s*(?:,|;|/|\||–|\bor\b|\bto\b)\s*(?:maybe\s+|perhaps\s+|possibly\s+)?(?:" + NUMBER + ")", re.I | re.ASCII)
_NEGATED = re.compile(r"(?:\bnot|n't|\bnever|≠|!=)\s*(?:equal\s+to\s+|be\s+)?$", re.IGNORECASE)
_LIST_GAP = re.compile(r"(?:\s|[,;|…]|\.{2,}|\bor\b)*", re.IGNORECASE)
_NEW_TURN = re.compile(r"\n" + _WS + r"*(?:Question|Q)" + _WS + r"*:")
_SENTENCE = re.compile(r"[^.?!\n]+[.?!\n]?|[.?!\n]")
_TEX = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    (re.compile(r"\\frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}"), r"\1/\2"),
    (re.compile(r"\\frac\s*(\d)\s*(\d)"), r"\1/\2"),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*\{([^{}]*)\}"), r" \1 "),
    (re.compile(r"\^\s*\{?\\circ\}?|\\left|\\right|\\[,!;:]|\\quad"), ""),
    (re.compile(r"\\[()\[\]]"), " "),
    (re.compile(r"\\([$%])"), r"\1"),
]
_SPACES = str.maketrans({"\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " "})


def cut_new_turn(text: str) -> str:
    """The answer up to a new question the model went on to write itself."""
    text = text.lstrip()
    m = _NEW_TURN.search(text)
    return text[: m.start()] if m else text


def clean(text: str) -> str:
    """Read through LaTeX and markdown decorations: `**72**`, `\\dfrac{3}{4}` (-> 3/4), `\\$5`,
    `1{,}000`, `72\\text{ dollars}`, the Unicode minus."""
    text = cut_new_turn(text).translate(_SPACES).replace("**", "").replace("{,}", ",")
    if "\\" in text:
        for pattern, repl in _TEX:
            text = pattern.sub(repl, text)
    return text


def _bound(text: str) -> str:
    text = text.strip()[:MAX_EXTRACTED]
    # Lone surrogates (bytes decoded with surrogateescape) cannot be stored as UTF-8 strings.
    return text.encode("utf-8", "replace").decode("utf-8")


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


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opened just before `start` (balanced), or None if unclosed."""
    depth = 1
    for i in range(start, min(len(text), start + 10_000)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def statements(text: str) -> list[str]:
    """The texts stated as final answers, in order: each `\\boxed{}` content, and what follows
    each `####` / "the answer is" / "Answer:" up to the end of its line (fillers like
    "approximately" removed)."""
    out = []
    for m in _MARKER.finditer(text):
        if m.group(0).startswith("\\boxed"):
            content = _braced(text, m.end())
            if content is not None:
                out.append(content)
            continue
        rest = text[m.end() : m.end() + 400]
        rest = rest[_FILLER.match(rest).end() :]
        out.append(rest.split("\n", 1)[0])
    return out


def _distinct(values: list, key: Callable) -> list:
    seen, out = set(), []
    for v in values:
        k = key(v)
        if k not in seen:
            seen.add(k)
            out.append(v)
    return out


def _without_questions(text: str, question: str | None = None) -> str:
    """Drop what states no answer: sentences ending in a question mark, and sentences copied from
    the question (a restated question). Sentences with an "=" are kept: they are working."""
    restated = " ".join(question.split()) if question else ""
    if "?" not in text and not restated:
        return text
    return "".join(
        s for s in _SENTENCE.findall(text)
        if not s.endswith("?") and not (restated and "=" not in s and len(s.strip()) > 3 and " ".join(s.split()) in restated)
    )


def _after_equals(statement: str) -> str:
    """"Answer: 16 - 3 = 13" states 13: the value after the last "=" of the statement's sentence."""
    first = re.split(r"\.\s|\n", statement, maxsplit=1)[0]
    return first[first.rindex("=") + 1 :].lstrip() if "=" in first else statement


def read_number(text: str, reference: str, question: str | None = None) -> Reading:
    """The final number of a completion (numeric kind), compared with the reference as numbers."""
    text = clean(text)
    ref = to_number(reference)
    stated = []  # (value, hedged)
    for s in statements(text):
        s = _after_equals(s)
        m = _NUMBER.match(s)
        if m and to_number(m.group(0)) is not None:
            hedge = _HEDGE.match(s, m.end())
            stated.append((s[: hedge.end()] if hedge else m.group(0), bool(hedge)))
    if stated:
        values = _distinct(stated, key=lambda v: v[0] if v[1] else to_number(v[0]))
        if len(values) >= 3:
            return Reading(_bound("; ".join(v for v, _ in values)), False, True)
        value, hedged = stated[-1]
        if hedged:
            return Reading(_bound(value), False, True)
        return Reading(_bound(value), ref is not None and to_number(value) == ref, True)
    text = _without_questions(text, question)
    # Every token has a digit, so only a zero denominator ("3/0") fails to parse.
    tokens = [m for m in _NUMBER.finditer(text) if "/" not in m.group(0) or to_number(m.group(0)) is not None]
    i = len(tokens) - 1
    while i >= 0 and _NEGATED.search(text, max(0, tokens[i].start() - 24), tokens[i].start()):
        i -= 1
    if i < 0:
        return Reading(None, False, False)
    last, value = tokens[i], tokens[i].group(0)
    if i > 0 and _LIST_GAP.fullmatch(text, tokens[i - 1].end(), last.start()) and to_number(tokens[i - 1].group(0)) != to_number(value):
        return Reading(_bound(text[tokens[i - 1].start() : last.end()]), False, False)  # the end of a list
    return Reading(_bound(value), ref is not None and to_number(value) == ref, False)


def normalize_text(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _sentence(text: str) -> str:
    """A statement up to its sentence end (". " or end of line), without trailing dots."""
    return re.split(r"\.\s", text, maxsplit=1)[0].strip().rstrip(".").strip()


def read_exact(text: str, reference: str) -> Reading:
    """Normalized string match of the stated answer, else of the last line."""
    text = clean(text)
    stated = [_sentence(s) for s in statements(text)]
    stated = [s for s in stated if normalize_text(s)]
    ref = normalize_text(reference)
    if stated:
        values = _distinct(stated, key=normalize_text)
        if len(values) >= 2:
            return Reading(_bound("; ".join(values)), False, True)
        return Reading(_bound(stated[-1]), normalize_text(stated[-1]) == ref, True)
    lines = [ln for ln in text.splitlines() if normalize_text(ln)]
    if not lines:
        return Reading(None, False, False)
    last = re.sub(r"^\s*(?:A|Answer)\s*:\s*", "", lines[-1], flags=re.I).strip().rstrip(".")
    return Reading(_bound(last), normalize_text(last) == ref, False)


_LETTER_AT_CS = re.compile(r"\s*(?:[Oo]ption\s+|[Cc]hoice\s+)?(?:\(([A-Ja-j])\)|([A-J])(?![\w'’])|([a-j])\s*(?:[.)]|$))", re.M)
_LETTER_HEDGE = re.compile(r"\s*(?:,|;|/|&|\bor\b|\band\b)\s*(?:option\s+)?\(?[A-J]\)?(?![\w'’])", re.I)
_PROSE_LETTER = re.compile(r"(?<![\w'’])\(?([A-J])\)?(?![\w'’])")
# "A" as an article and "I" as a pronoun: followed by a lower-case word that is not a verb about the option.
_NOT_A_LETTER = re.compile(r"\s+(?!(?:is|was|seems|looks|appears|must|should|would|could|might)\b)[a-z]")


def _option_hits(text: str, options: list[str]) -> set[str]:
    """Letters of the options whose text appears in `text` (word-bounded, normalized); an option
    contained in another matched option (\"York\" in \"New York\") does not count on its own."""
    norm = f" {normalize_text(text)} "
    hits = {i: normalize_text(c) for i, c in enumerate(options) if normalize_text(c) and f" {normalize_text(c)} " in norm}
    return {LETTERS[i] for i, t in hits.items() if not any(j != i and f" {t} " in f" {u} " and t != u for j, u in hits.items())}


def _choice_key(reference: str, options: list[str]) -> str:
    ref = reference.strip()
    if len(ref) == 1 and ref.upper() in LETTERS:
        return ref.upper()
    hits = [LETTERS[i] for i, c in enumerate(options) if normalize_text(c) == normalize_text(ref)]
    return hits[0] if len(hits) == 1 else ref.upper()


def read_choice(text: str, reference: str, choices, question: str | None = None) -> Reading:
    """The option chosen: a stated letter (or option text), else the one letter in the prose,
    else the one option whose text is mentioned. Several different options = wrong."""
    options = list(choices or [])
    valid = set(LETTERS[: len(options)]) if options else set(LETTERS)
    key = _choice_key(reference, options)
    text = clean(text)
    stated = []  # (letter, or None for a statement naming several options)
    for s in statements(text):
        m = _LETTER_AT_CS.match(s)
        if m:
            hedged = _LETTER_HEDGE.match(s, m.end()) is not None
            stated.append((None if hedged else next(g for g in m.groups() if g).upper(), _sentence(s)))
        elif options:
            hits = _option_hits(_sentence(s), options)
            if hits:
                stated.append((hits.pop() if len(hits) == 1 else None, _sentence(s)))
    if stated:
        letters = sorted({v for v, _ in stated if v})
        if stated[-1][0] is None:
            return Reading(_bound(stated[-1][1]), False, True)
        if len(letters) >= 2:
            return Reading(",".join(letters), False, True)
        return Reading(letters[0], letters[0] == key, True)
    prose = _without_questions(text, question)
    letters = set()
    for m in _PROSE_LETTER.finditer(prose):
        letter = m.group(1)
        if letter not in valid or _NEGATED.search(prose, max(0, m.start() - 24), m.start()):
            continue
        if letter in "AI" and not m.group(0).startswith("(") and _NOT_A_LETTER.match(prose, m.end()):
            continue
        letters.add(letter)
    if not letters and options:
        letters = _option_hits(prose, options)
    if not letters:
        return Reading(None, False, False)
    if len(letters) > 1:
        return Reading(",".join(sorted(letters)), False, False)
    (letter,) = letters
    return Reading(letter, letter == key, False)


_MATH_DROP = re.compile(r"\s+|\\left|\\right|\\[,!;:]|\\quad|\^\s*\{?\\circ\}?|\\%|%|\$")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?|-?\.\d+")
_INLINE_MATH = re.compile(r"\$([^$]{1,300})\$|\\\((.{1,300}?)\\\)")


def _math_norm(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    return _MATH_DROP.sub("", s).rstrip(".")


def _math_number(s: str) -> Fraction | None:
    s = re.sub(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}", r"\1/\2", _math_norm(s))
    return to_number(s) if _PLAIN_NUMBER.fullmatch(s) else None


def _math_candidate(text: str, question: str | None) -> tuple[str | None, bool, bool]:
    """(candidate, stated, several) for a math completion."""
    text = cut_new_turn(text).translate(_SPACES).replace("**", "")
    boxes = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        content = _braced(text, m.end())
        if content is not None:
            boxes.append((m.start(), m.end() + len(content) + 1, content.strip()))
    if boxes:
        distinct = _distinct([b[2] for b in boxes], key=_math_norm)
        between = text[boxes[-2][1] : boxes[-1][0]] if len(boxes) > 1 else ""
        several = len(distinct) >= 3 or (len(distinct) > 1 and re.search(r"\bor\b", between) is not None)
        return boxes[-1][2], True, several
    said = [_sentence(s).strip("$ ") for s in statements(text) if "\\boxed" not in s]
    if said and said[-1]:
        return said[-1], True, False
    inline = [a or b for a, b in _INLINE_MATH.findall(text)]
    if inline:
        return inline[-1].strip(), False, False
    reading = read_number(text, "", question)
    return reading.extracted, False, False


def read_math(text: str, reference: str, timeout_s: int = 5, question: str | None = None) -> Reading:
    """Equivalence through math-verify, after a cheap exact/numeric fast path that most rows take."""
    candidate, stated, several = _math_candidate(text, question)
    if candidate is None:
        return Reading(None, False, False)
    candidate = _bound(candidate)
    if several or re.search(r"\bor\b", candidate):
        return Reading(candidate, False, stated)
    if _math_norm(candidate) == _math_norm(reference):
        return Reading(candidate, True, stated)
    a, b = _math_number(candidate), _math_number(reference)
    if a is not None and b is not None:
        return Reading(candidate, a == b, stated)
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    # math-verify's timeout is signal.alarm, which works only in a process's main thread.
    timeout = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout, raise_on_error=True)
        answer = parse(f"\\boxed{{{candidate}}}", parsing_timeout=timeout, raise_on_error=True)
        if not gold or not answer:
            return Reading(candidate, False, stated, "math-verify", undecided=True)
        return Reading(candidate, bool(verify(gold, answer, timeout_seconds=timeout, raise_on_error=True)), stated, "math-verify")
    except TimeoutException:
        return Reading(candidate, False, stated, "math-verify", undecided=True)
    except Exception:  # noqa: BLE001 - sympy raises many types; all mean "could not compare"
        return Reading(candidate, False, stated, "math-verify", undecided=True)


def grade_numeric(completion: str, reference: str, choices=None, question=None, timeout_s: int = 5) -> Reading:
    return read_number(completion, reference, question)


def grade_math(completion: str, reference: str, choices=None, question=None, timeout_s: int = 5) -> Reading:
    return read_math(completion, reference, timeout_s, question)


def grade_choice(completion: str, reference: str, choices=None, question=None, timeout_s: int = 5) -> Reading:
    return read_choice(completion, reference, choices, question)


def grade_exact(completion: str, reference: str, choices=None, question=None, timeout_s: int = 5) -> Reading:
    return read_exact(completion, reference)


GRADERS: dict[str, Callable[..., Reading]] = {
    "numeric": grade_numeric,
    "math": grade_math,
    "choice": grade_choice,
    "exact": grade_exact,
}


def grade_row(completion, reference: str, kind: str, choices=None, finish_reason: str | None = None,
              error: str | None = None, timeout_s: int = 5, question: str | None = None) -> Graded:
    """One verdict with its `undecided` flag. Pure: the same inputs always give the same result."""
    if kind not in GRADERS:
        raise ValueError(f"unknown benchmark kind {kind!r}; valid: {sorted(GRADERS)}")
    if error:
        return Graded(False, None, "error", "rules", False)
    if isinstance(completion, (bytes, bytearray)):
        completion = bytes(completion).decode("utf-8", "replace")
    if not completion or not completion.strip():
        return Graded(False, None, "no_answer", "rules", False)
    r = GRADERS[kind](completion, reference or "", choices, question, timeout_s)
    if finish_reason == "length" and not r.stated:
        # Cut by the token limit before a final answer: a number mid-reasoning is not an answer.
        return Graded(False, None, "truncated", "rules", False)
    if r.extracted is None:
        return Graded(False, None, "no_answer", "rules", True)
    return Graded(r.correct, r.extracted, "match" if r.correct else "mismatch", r.marked_by, r.undecided)


def mark_row(completion, reference: str, kind: str, choices=None, finish_reason: str | None = None,
             error: str | None = None, timeout_s: int = 5, question: str | None = None) -> Verdict:
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
MARKER_RE2 = r"####|\\[Bb][Oo][Xx][Ee][Dd]\{|\b(?:[Ff][Ii][Nn][Aa][Ll]" + _WS + r"+)?" + _ANSWER_CI + _WS + r"*(?:[Ii][Ss]|:|=)"
_FAST_NUM = r"(?P<n>-?\$?(?:\d{1,3}(?:,\d{3}){1,2}|\d{1,9})(?:\.\d{1,6})?)[ \t]*\.?[ \t]*\n?$"
_FAST_STATED = r"(?s).(?:####|\b" + _ANSWER_CI + r" [Ii][Ss]|\b" + _ANSWER_CI + r":)[ \t]*" + _FAST_NUM
_FAST_LAST = r"[^!<>=]=[ \t]*" + _FAST_NUM
_FAST_REF = r"^-?\$?(?:\d{1,3}(?:,\d{3}){1,2}|\d{1,9})(?:\.\d{1,6})?$"
# Text that `clean` would change, or a new turn that `cut_new_turn` would cut.
_FAST_UNSAFE = r"[\\{\x{2212}\x{00a0}\x{2009}\x{202f}]|\*\*|\n" + _WS + r"*(?:Question|Q)" + _WS + r"*:"


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
    unsafe = pc.match_substring_regex(comp, _FAST_UNSAFE)
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


def grade_table(table: pa.Table, timeout_s: int = 5) -> pa.Table:
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


def mark_table(table: pa.Table, timeout_s: int = 5) -> pa.Table:
    """answers rows -> marked rows (same rows, same order, four columns added)."""
    return check(grade_table(table, timeout_s), MARKED, "mark output")


def mark_dataset(ds, batch_size: int, timeout_s: int = 5, judge=None):
    """The stateless Ray Data stage: a map over pyarrow batches; with a `judge` config (enabled),
    the rows the rules cannot decide are then put to the supervisory LLM (pipeline.judge)."""
    if judge is None or not judge.enabled:
        return ds.map_batches(mark_table, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"timeout_s": timeout_s})
    from pipeline.judge import judge_dataset

    graded = ds.map_batches(grade_table, batch_format="pyarrow", batch_size=batch_size, fn_kwargs={"timeout_s": timeout_s})
    return judge_dataset(graded, judge)
