"""Reading a stated final answer out of model text: the rules of lossaverse.pipeline.marker.mark for the `numeric`
and `exact` kinds, and the text preparation every kind shares (`choice`: lossaverse.pipeline.marker.markchoice).

Every pattern here runs over model text, so every one is linear-time: no quantifier inside a
quantifier that can split the same characters two ways, and possessive quantifiers (`*+`, `++`,
Python >= 3.11) where a failing match would otherwise backtrack. tests/unit/test_mark_hostile.py
checks the time per row on generated hostile text. What a pattern cannot bound, the amount of
text does: an answer is read on its first and last `READ_CHARS` characters, at most the last
`MAX_STATEMENTS` statements, boxes of at most `MAX_BOX_CHARS` characters.
"""

from __future__ import annotations

import re
from collections import deque
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from typing import Callable, NamedTuple


class Reading(NamedTuple):
    """What a grader read from one completion."""

    extracted: str | None  # the final answer read; None: nothing parseable
    correct: bool
    stated: bool  # given in a final-answer form, not guessed from the text
    marked_by: str = "rules"
    undecided: bool = False  # the rules could not decide (math-verify timed out / could not parse)


MAX_EXTRACTED = 200  # characters of `extracted` kept (an answer, not an essay)
READ_CHARS = 32_768  # an answer longer than 2 x this is read on its head and tail
MAX_STATEMENTS = 32  # the last this many stated answers are read (a shotgun is wrong either way)
MAX_BOX_CHARS = 4_000  # a \boxed{} longer than this is not an answer

# One number: sign (not a minus between operands), currency, 1,000 / 1000 / 3.14, a fraction
# 3/4, a percent; or a bare decimal .5. Not a digit inside a word ("AZYUK5A", "x2").
NUMBER = (
    r"(?:(?<![\w)\]}])-)?\$?\s?(?<![A-Za-z0-9])(?:\d{1,3}(?:,\d{3}(?!\d))++|\d++)(?:\.\d+)?(?:\s?/\s?\d+(?:\.\d+)?)?\s?%?"
    r"|(?:(?<![\w)\]}])-)?\$?\.\d+%?"
)
# ASCII semantics throughout (digits, \b, \s, case folding), so that the vectorised path's RE2
# patterns (lossaverse.pipeline.marker.mark) mean exactly the same.
_NUMBER = re.compile(NUMBER, re.ASCII)
# A number in math delimiters, as Minerva-style answers write it: "$-5$", "$\$18$", "$$667$$".
_DELIMITED_NUMBER = re.compile(r"\$\$?\s*+(" + NUMBER + r")\s*+\$\$?", re.ASCII)
ASCII_SPACE = r"[ \t\n\r\f\v]"  # \s under re.ASCII, spelled out for the RE2 patterns of mark.py too
# Where a stated final answer starts. "Final Answer: The final answer is" (Minerva) is one marker.
MARKER = (
    r"####|\\boxed\{|\b(?:final" + ASCII_SPACE + r"++)?answer" + ASCII_SPACE + r"*+(?:is|:|=)"
    r"(?:" + ASCII_SPACE + r"*+(?:the" + ASCII_SPACE + r"++)?(?:final" + ASCII_SPACE + r"++)?answer" + ASCII_SPACE + r"++is\b)?"
)
_MARKER = re.compile(MARKER, re.IGNORECASE | re.ASCII)
# A statement that declares itself final: "Final Answer: ...", "#### ...".
FINAL_MARK = re.compile(r"####|final\s", re.IGNORECASE)
# MARKER less `\boxed{` (lossaverse.pipeline.marker.markmath finds boxes itself).
HASH_OR_SAID = re.compile("####|" + MARKER.split("|", 2)[2], re.IGNORECASE | re.ASCII)
_FILLER = re.compile(
    r"\s*+:?\s*+(?:(?:approximately|about|around|roughly|exactly|precisely|just|only|equal to|equals|"
    r"a total of|therefore|thus|then|simply)\s++)*+",
    re.IGNORECASE,
)
# A second value right after a stated one: "3 or 4", "3, 4", "3 to 4" (hedging).
_HEDGE = re.compile(r"\s*+(?:,|;|/|\||–|\bor\b|\bto\b)\s*+(?:maybe\s++|perhaps\s++|possibly\s++)?(?:" + NUMBER + ")", re.I | re.ASCII)
NEGATED = re.compile(r"(?:\bnot|n't|\bnever|≠|!=)\s*+(?:equal\s++to\s++|be\s++)?$", re.IGNORECASE)
_LIST_GAP = re.compile(r"(?:\s|[,;|…]|\.{2,}+|\bor\b)*+", re.IGNORECASE)
# A new question the model writes itself. Its start is the last newline before it, so that a run
# of blank lines is scanned once, not once per newline.
# A chat model's run-on turn with its control tokens dropped from the text (vLLM detokenizes with
# skip_special_tokens): "<|im_start|>user" comes out as a line that reads "user" alone.
NEW_TURN = r"\n[ \t\r\f\v]*+(?:(?:Question|Q)" + ASCII_SPACE + r"*+:|(?:user|assistant|system)[ \t]*+\n)"
_NEW_TURN = re.compile(NEW_TURN)
# Chat-template control tokens: the model's turn ended at the first one (what follows is a turn it
# wrote for someone else). A leading assistant header is the start of the answer, not its end.
_CHAT_HEAD = re.compile(r"\A\s*+(?:<\|im_start\|>assistant|<\|start_header_id\|>assistant<\|end_header_id\|>|<\|assistant\|>|<start_of_turn>model)")
_CHAT_END = re.compile(
    r"<\|(?:im_end|im_start|eot_id|eom_id|start_header_id|end_header_id|endoftext|end_of_text|end|user|system|assistant)\|>"
    r"|</s>|<(?:end|start)_of_turn>"
)
# The end of a reasoning trace (R1-style <think>, OpenThoughts' begin/end_of_thought).
_TRACE_END = re.compile(r"</think>|<\|end_of_thought\|>")
_TRACE_START = re.compile(r"<think>|<\|begin_of_thought\|>")
_SENTENCE = re.compile(r"[^.?!\n]++[.?!\n]?|[.?!\n]")
_QUESTION_SENTENCE = re.compile(r"(?<![^.?!\n])[^.?!\n]*+\?")
_TEX = [
    (re.compile(r"\\[dt]frac"), r"\\frac"),
    # \frac{3}{4}, and the forms LaTeX accepts with a one-digit argument unbraced: \frac34, \frac3{4}, \frac{3}4
    (re.compile(r"\\frac\s*+(?:\{\s*+(-?[\d.,]++)\s*+\}|(\d))\s*+(?:\{\s*+(-?[\d.,]++)\s*+\}|(\d))"),
     lambda m: f"{m.group(1) or m.group(2)}/{m.group(3) or m.group(4)}"),
    # A relation or operator written against its number ("x\approx11"): the number stands on its own.
    (re.compile(r"(\\(?:approx|simeq|sim|cong|equiv|times|cdot|div))(?=\d)"), r"\1 "),
    (re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox)\s*+\{([^{}]*+)\}"), r" \1 "),
    (re.compile(r"\^\s*+\{?\\circ\}?|\\left|\\right|\\[,!;:]|\\quad"), ""),
    (re.compile(r"\\[()\[\]]"), " "),
    (re.compile(r"\\([$%])"), r"\1"),
]
_SPACES = str.maketrans({"\u2212": "-", "\u00a0": " ", "\u2009": " ", "\u202f": " "})


class Prepared(NamedTuple):
    text: str
    in_trace: bool  # the text ends inside an unclosed reasoning trace: no final answer was given


def prepare(text: str) -> Prepared:
    """The part of a completion that is its answer: up to the end of the model's turn (a chat
    control token, a new question it writes itself), after its reasoning trace (`</think>`), and
    of an overlong answer its first and last `READ_CHARS` characters."""
    in_trace = False
    if "<" in text:  # every chat and trace tag starts with one; most answers have none
        head = _CHAT_HEAD.match(text)
        if head:
            text = text[head.end() :]
        end = _CHAT_END.search(text)
        if end:
            text = text[: end.start()]
        ends = deque(_TRACE_END.finditer(text), maxlen=1)
        if ends:
            text = text[ends[0].end() :]
        elif _TRACE_START.search(text):
            in_trace = True
    return Prepared(window(cut_new_turn(text)), in_trace)


def window(text: str) -> str:
    """An overlong answer's first and last `READ_CHARS` characters (the statement of a megabyte of
    degenerate text is at one end of it, if anywhere)."""
    return text[:READ_CHARS] + "\n\n" + text[-READ_CHARS:] if len(text) > 2 * READ_CHARS else text


def cut_new_turn(text: str) -> str:
    """The answer up to a new question the model went on to write itself."""
    text = text.lstrip()
    m = _NEW_TURN.search(text)
    return text[: m.start()].rstrip(" \t\r\f\v") if m else text


def clean(text: str) -> str:
    """Read through LaTeX and markdown decorations: `**72**`, `\\dfrac{3}{4}` (-> 3/4), `\\$5`,
    `1{,}000`, `72\\text{ dollars}`, the Unicode minus."""
    text = window(cut_new_turn(text)).translate(_SPACES).replace("**", "").replace("{,}", ",")
    if "\\" in text:
        for pattern, repl in _TEX:
            text = pattern.sub(repl, text)
    return text


def bound(text: str) -> str:
    text = text.strip()[:MAX_EXTRACTED]
    # Lone surrogates (bytes decoded with surrogateescape) cannot be stored as UTF-8 strings.
    return text.encode("utf-8", "replace").decode("utf-8")


def to_number(text: str | None) -> Fraction | None:
    """Parse a stated number: `$1,000.`, `.5`, `0.50`, `3/4`, `50%` (the number before %)."""
    if text is None:
        return None
    s = text.strip().rstrip(".").replace("$", "").replace(",", "").replace(" ", "").rstrip("%")
    if not s or s in {"-", "."} or len(s) > 1000:
        return None
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            return Fraction(Decimal(num)) / Fraction(Decimal(den)) if Decimal(den) != 0 else None
        return Fraction(Decimal(s))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


# What may follow the one number of a numeric reference: a unit or currency word, nothing else.
_REFERENCE_TAIL = re.compile(r"[ \t]*+(?:[A-Za-z][A-Za-z.]*+[ \t]*+){0,3}")


def reference_text(reference: str) -> str | None:
    """A numeric reference read as a completion's number is: cleaned like one ("−5" -> "-5",
    "\\$5" -> "$5", "1{,}000" -> "1,000"), a decimal comma read as a point ("1,22" -> "1.22";
    not in a number whose commas group thousands), then one number, optionally followed by a unit
    word ("5 dollars" -> "5"). None if it is not that ("3:30", "5 - 3", "five");
    lossaverse.pipeline.sources.benchmarks quarantines such items."""
    text = clean(reference).strip().rstrip(".").strip()
    if "," in text:
        text = _DECIMAL_COMMA.sub(_decimal_comma, text)
    d = _DELIMITED_NUMBER.fullmatch(text)
    if d:
        text = d.group(1).strip()
    m = _NUMBER.match(text)
    if not m or not _REFERENCE_TAIL.fullmatch(text, m.end()) or to_number(m.group(0)) is None:
        return None
    return m.group(0).strip()


@lru_cache(maxsize=65_536)
def reference_number(reference: str) -> Fraction | None:
    """The value of a numeric reference (`reference_text`), or None."""
    text = reference_text(reference)
    return None if text is None else to_number(text)


_BRACE = re.compile(r"[{}]")


def braced(text: str, start: int) -> str | None:
    """The content of the brace group opened just before `start` (balanced), or None if unclosed
    within `MAX_BOX_CHARS`."""
    depth = 1
    for m in _BRACE.finditer(text, start, start + MAX_BOX_CHARS):
        depth += 1 if m.group(0) == "{" else -1
        if depth == 0:
            return text[start : m.start()]
    return None


class Statement(NamedTuple):
    text: str
    start: int  # where its marker starts in the text
    boxed: bool


def stated(text: str) -> list[Statement]:
    """The last `MAX_STATEMENTS` texts stated as final answers, in order: each `\\boxed{}` content,
    and what follows each `####` / "the answer is" / "Answer:" up to the end of its line (fillers
    like "approximately" removed)."""
    out = []
    for m in deque(_MARKER.finditer(text), maxlen=MAX_STATEMENTS):
        if m.group(0).startswith("\\boxed"):
            content = braced(text, m.end())
            if content is not None:
                out.append(Statement(content, m.start(), True))
            continue
        rest = text[m.end() : m.end() + 400]
        rest = rest[_FILLER.match(rest).end() :]
        out.append(Statement(rest.split("\n", 1)[0], m.start(), False))
    return out


def statements(text: str) -> list[str]:
    return [s.text for s in stated(text)]


def distinct(values: list, key: Callable) -> list:
    seen, out = set(), []
    for v in values:
        k = key(v)
        if k not in seen:
            seen.add(k)
            out.append(v)
    return out


def without_questions(text: str, question: str | None = None) -> str:
    """Drop what states no answer: sentences ending in a question mark, and sentences copied from
    the question (a restated question). Sentences with an "=" are kept: they are working."""
    if "?" in text:
        text = _QUESTION_SENTENCE.sub("", text)
    restated = " ".join(question.split()) if question else ""
    if not restated:
        return text
    return "".join(
        s for s in _SENTENCE.findall(text)
        if not ("=" not in s and len(s.strip()) > 3 and " ".join(s.split()) in restated)
    )


def after_equals(statement: str) -> str:
    """"Answer: 16 - 3 = 13" states 13: the value after the last "=" of the statement's sentence."""
    first = re.split(r"\.\s|\n", statement, maxsplit=1)[0]
    return first[first.rindex("=") + 1 :].lstrip() if "=" in first else statement


# A statement in prose ("The largest $n$ is 34.", Minerva): its value follows the last copula.
_COPULA = re.compile(r".*(?:\sis|\sare|\sequals|=)\s++", re.S)


def prose_value(statement: str) -> str | None:
    """The value a prose statement gives: what follows its first sentence's last "is" / "=" (None if
    it has none)."""
    first = re.split(r"\.\s|\n", statement, maxsplit=1)[0]
    m = _COPULA.match(first)
    return first[m.end() :] if m and m.end() < len(first) else None


def _stated_number(s: str) -> tuple[str, bool] | None:
    """(value, hedged) of a statement that starts with a number, else None."""
    d = _DELIMITED_NUMBER.match(s)
    if d and to_number(d.group(1)) is not None:
        return d.group(1), False
    m = _NUMBER.match(s)
    if m and to_number(m.group(0)) is not None:
        hedge = _HEDGE.match(s, m.end())
        return (s[: hedge.end()], True) if hedge else (m.group(0), False)
    return None


# Where a number is part of a LaTeX expression: after "}{" (a denominator), "^" or "_", or \sqrt.
_IN_EXPRESSION = re.compile(r"(?:\}\s*+\{|[\^_]\s*+\{?|\\sqrt\s*+\{?)\s*+$")


# "1000,99", "0,111", "2,74": a comma between digits that is no thousands separator (one comma,
# and not 1-3 digits, not starting with 0, before 3 digits).
_DECIMAL_COMMA = re.compile(r"(?<![\d,.])(\d++),(\d++)(?![\d,]|\.\d)")


def _decimal_comma(m: re.Match) -> str:
    before, after = m.group(1), m.group(2)
    thousands = len(after) == 3 and len(before) <= 3 and before[0] != "0"
    return m.group(0) if thousands else f"{before}.{after}"


def decimal_commas(text: str, ref: Fraction | None) -> str:
    """A decimal comma read as a point, where the reference decides it: only against a reference
    with a fractional part (1000.99), and never in a number whose commas group thousands (1,000 and
    12,345 stay integers, whatever the reference)."""
    if ref is None or ref.denominator == 1 or "," not in text:
        return text
    return _DECIMAL_COMMA.sub(_decimal_comma, text)


def _after_final_line(text: str, said: list[Statement]) -> list[Statement]:
    """A "Final Answer:" / "####" line is the final answer: boxes before it boxed intermediate results."""
    finals = [i for i, s in enumerate(said) if not s.boxed and FINAL_MARK.match(text, s.start)]
    return [s for i, s in enumerate(said) if not (s.boxed and i < finals[-1])] if finals else said


def read_number(text: str, reference: str, question: str | None = None) -> Reading:
    """The final number of a completion (numeric kind), compared with the reference as numbers."""
    ref = reference_number(reference) if reference else None
    text = decimal_commas(clean(text), ref)
    values = []  # (value, hedged)
    for s in _after_final_line(text, stated(text)):
        s = after_equals(s.text)
        got = _stated_number(s)
        if got is None and (prose := prose_value(s)) is not None:
            got = _stated_number(prose)
        if got is not None:
            values.append(got)
    if values:
        different = distinct(values, key=lambda v: v[0] if v[1] else to_number(v[0]))
        if len(different) >= 3:
            return Reading(bound("; ".join(v for v, _ in different)), False, True)
        value, hedged = values[-1]
        if hedged:
            return Reading(bound(value), False, True)
        return Reading(bound(value), ref is not None and to_number(value) == ref, True)
    text = without_questions(text, question)
    # Every token has a digit, so only a zero denominator ("3/0") fails to parse.
    # The last number is near the end: scan the last READ_CHARS characters, from a line start.
    start = 0 if len(text) <= READ_CHARS else text.find("\n", len(text) - READ_CHARS) + 1
    tokens = [m for m in deque(_NUMBER.finditer(text, start), maxlen=256) if "/" not in m.group(0) or to_number(m.group(0)) is not None]
    i = len(tokens) - 1
    while i >= 0 and NEGATED.search(text, max(0, tokens[i].start() - 24), tokens[i].start()):
        i -= 1
    if i < 0:
        return Reading(None, False, False)
    last, value = tokens[i], tokens[i].group(0)
    if _IN_EXPRESSION.search(text, max(0, last.start() - 12), last.start()):
        # A denominator, exponent or root ("$\\frac{1+\\sqrt{5}}{2}$"): the answer is an expression, not this number.
        line, end = text.rfind("\n", 0, last.start()) + 1, text.find("\n", last.end())
        return Reading(bound(text[max(line, last.start() - 80) : end if end >= 0 else len(text)]), False, False)
    if i > 0 and _LIST_GAP.fullmatch(text, tokens[i - 1].end(), last.start()) and to_number(tokens[i - 1].group(0)) != to_number(value):
        return Reading(bound(text[tokens[i - 1].start() : last.end()]), False, False)  # the end of a list
    return Reading(bound(value), ref is not None and to_number(value) == ref, False)


def normalize_text(text: str) -> str:
    text = re.sub(r"[^\w\s]", " ", text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def sentence(text: str) -> str:
    """A statement up to its sentence end (". " or end of line), without trailing dots."""
    return re.split(r"\.\s", text, maxsplit=1)[0].strip().rstrip(".").strip()


def read_exact(text: str, reference: str) -> Reading:
    """Normalized string match of the stated answer, else of the last line."""
    text = clean(text)
    said = [sentence(s) for s in statements(text)]
    said = [s for s in said if normalize_text(s)]
    ref = normalize_text(reference)
    if said:
        values = distinct(said, key=normalize_text)
        if len(values) >= 2:
            return Reading(bound("; ".join(values)), False, True)
        return Reading(bound(said[-1]), normalize_text(said[-1]) == ref, True)
    lines = [ln for ln in text[-READ_CHARS:].splitlines() if normalize_text(ln)]
    if not lines:
        return Reading(None, False, False)
    last = re.sub(r"^\s*+(?:A|Answer)\s*+:\s*+", "", lines[-1], flags=re.I).strip().rstrip(".")
    return Reading(bound(last), normalize_text(last) == ref, False)
