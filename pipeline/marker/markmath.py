"""The `math` kind: the final answer of a solution, compared with a LaTeX reference, as a set when
the reference holds several values, through math-verify within the row's time budget.

Which answer: the last final-answer statement in the text, a `\\boxed{}` or a "Final Answer: ..."
line alike (Minerva's "The final answer is $X$. I hope it is correct.", or prose like "The largest
$n$ is 34." whose value follows its last "is"); else the last inline math; else the last number.
A reference written as a worked solution (a `\\boxed{}` or a "Final Answer:" line in it) is read
for its final answer the same way.

Sets, decided from the reference: a reference with several values at its top level ("1, 2, 3",
"(2,1),(1,2)", "\\{1,2,3\\}"; a comma inside brackets, as in an interval or a point, does not count)
is a set, and so is one that lists its values with "and" / "or" ("$21, 16$ or $11$"). The answer's
values are then the contents of its final run of boxes (boxes close together, joined by a comma,
"and" or "or" or by no words at all: "\\boxed{1}, \\boxed{2} and \\boxed{3}", not "\\boxed{1} no no
\\boxed{2}"), each split at its own top-level commas, or of the final statement ("x = 1 and x = -2",
split at commas, "and", "or"). Right when they are the reference's values, in any order, none
missing and none extra. A single-valued reference keeps the hedging rule: three or more different
boxes, or two joined by "or", is wrong.

Numbers: equal as exact values ("32, 349" is two numbers, not 32,349); a decimal of six or more
places also stands for a fraction whose decimal does not end, rounded or cut there (0.0833333 for
1/12: math-verify's default precision).

Time: math-verify's own timeout is signal.alarm, which works only in a process's main thread (and
takes whole seconds). `budget` below enforces the row's budget in any thread instead.
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections import deque
from contextlib import contextmanager
from fractions import Fraction
from functools import lru_cache

from lossaverse.pipeline.marker.marktext import (
    FINAL_MARK,
    HASH_OR_SAID,
    MAX_STATEMENTS,
    READ_CHARS,
    Reading,
    bound,
    braced,
    cut_new_turn,
    distinct,
    prose_value,
    read_number,
    sentence,
    to_number,
    window,
)

_MATH_DROP = re.compile(r"\s++|\\left|\\right|\\[,!;:]|\\quad|\^\s*+\{?\\circ\}?|\\%|%|\$")
_PLAIN_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})++|\d++)(?:\.\d++)?(?:/\d++(?:\.\d++)?)?|-?\.\d++")
_INLINE_DOLLARS = re.compile(r"\$([^$]{1,300}+)\$")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*+\{")
_SPACES = str.maketrans({"\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " "})
_PROSE_START = re.compile(r"[A-Za-z]{2,}\b")
_ASSIGNED = re.compile(r"\A\s*+[A-Za-z](?:_\{?\w+\}?)?\s*+=\s*+")
_SET_BRACES = re.compile(r"\A(?:\\left)?\\\{(.*)(?:\\right)?\\\}\Z|\A\{(.*)\}\Z", re.S)
_CONNECTOR = re.compile(r"\s*+(?:\band\b|\bor\b|\\text\{\s*+(?:and|or)\s*+\})\s*+")
_SPACED_COMMA = re.compile(r"\d,\s")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})++(?:\.\d++)?")
_SPLIT_AT = re.compile(r"\\[{},]|[(){}\[\],]")  # \, is a thin space, not a comma
# What may join the boxes of one answer: a comma or semicolon, "and", "or".
_JOINER = re.compile(r"[,;]|\b(?:and|or)\b")
# A word of prose between two boxes (not a command's name: \quad, \text).
_GAP_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
# Math delimiters and quotes around a stated answer: $x$, \(x\), \[x\], "x".
_DELIMITERS = re.compile(r"\A(?:\s|\$|\\[(\[]|\\?\")*+(.*?)(?:\s|\$|\\[)\]]|\\?\")*+\Z", re.S)
# What sympy would compute in C, where no budget can stop it: a power tower (10^{10^{10}}), an
# exponent of six or more digits, a factorial or binomial of five or more digits.
_HUGE = re.compile(r"\^\s*+(?:\{[^{}^]*+\^|[\w.]++\s*+\^|\{?\s*+-?\d{6,}+)|\d{5,}+\s*+!|\\binom\s*+\{\s*+\d{5,}+")
DECIMALS = 6  # places from which a decimal may stand for a fraction whose decimal does not end (math-verify's default precision)
_LONG_DECIMAL = re.compile(r"\.(\d{%d,}+)\Z" % DECIMALS)
MAX_SET = 16  # values of a set answer read (a reference with more is compared as one value)
BOX_GAP = 48  # characters between two boxes of one answer ("$, $", "\\) and \\(")


class RowTimeout(BaseException):
    """The row's time budget ran out. A BaseException, so that math-verify's and sympy's
    `except Exception` blocks cannot swallow it."""


@contextmanager
def budget(seconds: float):
    """Raise RowTimeout in the current thread once `seconds` have passed, in any thread (the
    main one or not). The exception is delivered between two bytecodes, as a signal handler's is;
    sympy is pure Python, so it stops there. Written here because math-verify leaves timeouts in
    threads to its caller, and the libraries that do this (stopit, func-timeout) are unmaintained
    and run the call in an extra thread; this is their mechanism, PyThreadState_SetAsyncExc."""
    if seconds <= 0:
        raise RowTimeout
    tid, lock, state = threading.get_ident(), threading.Lock(), {"running": True, "fired": False}

    def fire():
        # Delivered again every 50 ms until the block has ended: an exception that lands in a
        # weakref callback or a __del__ is printed and dropped, and the work would go on.
        while True:
            with lock:
                if not state["running"]:
                    return
                state["fired"] = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(RowTimeout))
            time.sleep(0.05)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            state["running"] = False
        timer.cancel()
        if state["fired"]:
            # Fired just as the block ended: clear it if still pending; raised, it reached the caller.
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)


def _math_norm(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*+\{([^{}]*+)\}", r"\1", s)
    return _MATH_DROP.sub("", s).rstrip(".")


def _math_number(s: str) -> Fraction | None:
    if _SPACED_COMMA.search(s):
        return None  # "32, 349" lists two numbers; thousands are grouped "32,349" or "32{,}349"
    s = re.sub(r"\\[dt]?frac\s*+\{\s*+(-?[\d.]++)\s*+\}\s*+\{\s*+(-?[\d.]++)\s*+\}", r"\1/\2", _math_norm(s))
    return to_number(s) if _PLAIN_NUMBER.fullmatch(s) else None


def split_top_level(s: str) -> list[str]:
    """`s` split at the commas outside brackets: "(2,1),(1,2)" -> ["(2,1)", "(1,2)"]; "(-\\infty,3]" stays whole."""
    parts, depth, last = [], 0, 0
    for m in _SPLIT_AT.finditer(s):
        c = m.group(0)
        if c == "\\,":
            continue
        if c == ",":
            if depth == 0:
                parts.append(s[last : m.start()])
                last = m.end()
        elif c in "([{" or c == "\\{":
            depth += 1
        else:
            depth = max(0, depth - 1)
    parts.append(s[last:])
    return [p.strip() for p in parts]


def _unbrace(s: str) -> str:
    m = _SET_BRACES.match(s.strip())
    return (m.group(1) if m.group(1) is not None else m.group(2)).strip() if m else s.strip()


def reference_answer(reference: str) -> str:
    """The answer a reference states. A reference written as a worked solution (MATH's `solution`,
    a gold with `\\boxed{}` or a "Final Answer:" line) is read for its final answer as a completion
    is, its final run of boxes joined by commas; any other reference is its own answer."""
    if not (_BOX.search(reference) or HASH_OR_SAID.search(reference)):
        return reference
    text = window(reference).translate(_SPACES)
    boxes, said, _ = _final(text)
    if said is not None:
        return said
    return ", ".join(b[2] for b in _box_run(text, boxes)) if boxes else reference


@lru_cache(maxsize=65_536)
def read_reference(reference: str) -> tuple[str, tuple[str, ...] | None]:
    """(answer, values) of a reference: `reference_answer`, and its `reference_set` as a tuple.
    Cached: a benchmark's references repeat, once per sample of each question."""
    answer = reference_answer(reference)
    values = reference_set(answer)
    return answer, None if values is None else tuple(values)


def reference_set(reference: str) -> list[str] | None:
    """The values of a reference that holds several (see the module docstring), else None."""
    ref = _unbrace(reference.strip().strip("$").strip())
    if len(ref) > 2000 or _THOUSANDS.fullmatch(ref):
        return None
    values = [v for v in _values(ref) if v]
    return values if 2 <= len(values) <= MAX_SET else None


def _values(statement: str) -> list[str]:
    """The values a statement lists: "$x=1$ and $x=-2$" -> ["1", "-2"]."""
    out = []
    for part in split_top_level(_unbrace(statement.replace("$", " "))):
        out += [p for p in _CONNECTOR.split(part) if p.strip() and p.strip() not in ("and", "or")]
    return [_ASSIGNED.sub("", v).strip().rstrip(".") for v in out]


def _final(text: str) -> tuple[list[tuple[int, int, str]], str | None, bool]:
    """(boxes, said, stated): the boxes (start, end, content) if the final statement is a box, or the
    final statement's text `said` if it is a "Final Answer:"-style line."""
    boxes = []
    for m in deque(_BOX.finditer(text), maxlen=MAX_STATEMENTS):
        content = braced(text, m.end())
        if content is not None:
            boxes.append((m.start(), m.end() + len(content) + 1, content.strip()))
    said = None
    for s in deque(HASH_OR_SAID.finditer(text), maxlen=MAX_STATEMENTS):
        # After a box, only a "Final Answer:" line overrides it ("the answer is correct" does not).
        if boxes and (s.start() < boxes[-1][0] or not FINAL_MARK.match(s.group(0))):
            continue
        line = text[s.end() : s.end() + 400].split("\n", 1)[0]
        if "\\boxed" in line or "\\fbox" in line:
            continue
        value = sentence(line).strip()
        if _PROSE_START.match(value) and (after := prose_value(value + ". ")) is not None:
            value = after
        said = _DELIMITERS.match(value).group(1)
    if said:
        return [], said, True
    return boxes, None, bool(boxes)


def _box_run(text: str, boxes: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """The final run of boxes that state one answer together: each at most `BOX_GAP` characters
    before the next, with nothing between them but punctuation, math delimiters, spacing and
    commands, or else a joining comma, "and" or "or" ("\\boxed{1}, \\boxed{2} and \\boxed{3}")."""
    group = [boxes[-1]]
    for box in reversed(boxes[:-1]):
        gap = text[box[1] : group[0][0]]
        if len(gap) > BOX_GAP or len(group) >= MAX_SET or (_GAP_WORD.search(gap) and not _JOINER.search(gap)):
            break
        group.insert(0, box)
    return group


def _last_inline(text: str) -> str | None:
    """The content of the last inline math, `$...$` or `\\(...\\)` (at most 300 characters).
    The `\\(` pair is found from the end with rfind: a pattern scanning forward from every `\\(`
    would be quadratic on a run of them."""
    dollars = deque(_INLINE_DOLLARS.finditer(text), maxlen=1)
    close = text.rfind("\\)")
    opened = text.rfind("\\(", max(0, close - 302), close) if close > 0 else -1
    paren = (opened + 2, close) if opened >= 0 and 1 <= close - opened - 2 <= 300 else None
    if paren and (not dollars or paren[1] > dollars[0].end()):
        return text[paren[0] : paren[1]]
    return dollars[0].group(1) if dollars else None


def _candidate(text: str, question: str | None, ref_values: tuple[str, ...] | None) -> tuple[list[str] | None, str | None, bool, bool]:
    """(values, candidate, stated, several) for a math completion: `values` when the reference is a
    set, else one `candidate`."""
    boxes, said, stated = _final(text)
    if ref_values is not None and (boxes or said):
        if said is not None:
            return _values(said), said, True, False
        group = _box_run(text, boxes)
        values = [v for b in group for v in _values(b[2])]
        return values, ", ".join(b[2] for b in group), True, False
    if said is not None:
        return None, said, True, False
    if boxes:
        different = distinct([b[2] for b in boxes], key=_math_norm)
        between = text[boxes[-2][1] : boxes[-1][0]] if len(boxes) > 1 else ""
        several = len(different) >= 3 or (len(different) > 1 and re.search(r"\bor\b", between) is not None)
        return None, boxes[-1][2], True, several
    inline = _last_inline(text[-READ_CHARS:])
    candidate = inline.strip() if inline else read_number(text, "", question).extracted
    if ref_values is not None and candidate is not None:
        return _values(candidate), candidate, False, False
    return None, candidate, False, False


def _approximates(text: str, value: Fraction, exact: Fraction) -> bool:
    """`text`, a decimal of at least `DECIMALS` places, is `exact` rounded or cut there, where
    `exact`'s decimal does not end (0.0833333 for 1/12; never 2.5000001 for 2.5)."""
    m = _LONG_DECIMAL.search(_math_norm(text))
    if m is None:
        return False
    den = exact.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    return den > 1 and abs(value - exact) < Fraction(1, 10 ** len(m.group(1)))


class _Undecided(Exception):
    """math-verify could not parse or compare."""


def _same(answer: str, reference: str, deadline: float) -> tuple[bool, bool]:
    """(equal, by math-verify): the cheap string and number checks, then math-verify with what is left
    of the row's budget. Raises RowTimeout or _Undecided."""
    if _math_norm(answer) == _math_norm(reference):
        return True, False
    a, b = _math_number(answer), _math_number(reference)
    if a is not None and b is not None:
        return a == b or _approximates(answer, a, b) or _approximates(reference, b, a), False
    if _HUGE.search(answer) or _HUGE.search(reference):
        raise _Undecided
    from math_verify import parse, verify  # deferred: math-verify loads in seconds

    with budget(deadline - time.monotonic()):
        try:
            gold = parse(f"${reference}$", parsing_timeout=None, raise_on_error=True)
            got = parse(f"\\boxed{{{answer}}}", parsing_timeout=None, raise_on_error=True)
            if not gold or not got:
                raise _Undecided
            return bool(verify(gold, got, timeout_seconds=None, raise_on_error=True)), True
        except _Undecided:
            raise
        except Exception as exc:  # noqa: BLE001 - sympy raises many types; all mean "could not compare"
            raise _Undecided from exc


def _same_set(values: list[str], ref_values: tuple[str, ...], deadline: float) -> tuple[bool, bool]:
    """Every value matches a different reference value and none is left over (any order)."""
    values = distinct([v for v in values if v], key=_math_norm)
    if len(values) != len(ref_values):
        return False, False
    left, used_mv = list(ref_values), False
    for v in values:
        for i, r in enumerate(left):
            equal, mv = _same(v, r, deadline)
            used_mv |= mv
            if equal:
                del left[i]
                break
        else:
            return False, used_mv
    return True, used_mv


def read_math(text: str, reference: str, timeout_s: float = 5, question: str | None = None) -> Reading:
    """Equivalence through math-verify, after a cheap exact/numeric fast path that most rows take;
    math-verify's calls for the row share `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    text = window(cut_new_turn(text)).translate(_SPACES).replace("**", "").replace("\\$", "")
    reference, ref_values = read_reference(reference)
    values, candidate, stated, several = _candidate(text, question, ref_values)
    if candidate is None:
        return Reading(None, False, False)
    candidate = bound(candidate)
    try:
        if values is not None:
            equal, mv = _same_set(values, ref_values, deadline)
            return Reading(candidate, equal, stated, "math-verify" if mv else "rules")
        if several or re.search(r"\bor\b", candidate):
            return Reading(candidate, False, stated)
        equal, mv = _same(candidate, reference, deadline)
        return Reading(candidate, equal, stated, "math-verify" if mv else "rules")
    except (RowTimeout, _Undecided):
        return Reading(candidate, False, stated, "math-verify", undecided=True)
