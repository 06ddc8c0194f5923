"""Reading the option a model chose, for the `choice` kind of lossaverse.pipeline.marker.mark: a stated
letter (or option text), else the one letter in the prose, else the one option whose text is
mentioned. The linear-time rules of lossaverse.pipeline.marker.marktext hold here too."""

from __future__ import annotations

import re
from collections import deque
from functools import lru_cache
from typing import NamedTuple

from lossaverse.pipeline.data.prompts import LETTERS
from lossaverse.pipeline.marker.marktext import (NEGATED, Reading, bound, clean, normalize_text, sentence, statements,
                                                 without_questions)


class _LetterRules(NamedTuple):
    at_statement: re.Pattern
    hedge: re.Pattern
    prose: re.Pattern


@lru_cache(maxsize=None)
def _letter_rules(n: int) -> _LetterRules:
    """The letter patterns for options A..LETTERS[n-1]; at least A-J, so that the usual 4- to 10-option
    benchmarks read exactly as they always have."""
    last = LETTERS[max(10, n) - 1]
    up, low = f"A-{last}", f"a-{last.lower()}"
    return _LetterRules(
        re.compile(rf"\s*+(?:[Oo]ption\s++|[Cc]hoice\s++)?(?:\(([{up}{low}])\)|([{up}])(?![\w'’])|([{low}])\s*+(?:[.)]|$))", re.M),
        re.compile(rf"\s*+(?:,|;|/|&|\bor\b|\band\b)\s*+(?:option\s++)?\(?[{up}]\)?(?![\w'’])", re.I),
        re.compile(rf"(?<![\w'’])\(?([{up}])\)?(?![\w'’])"),
    )


# "A" as an article and "I" as a pronoun: followed by a lower-case word that is not a verb about the option.
_NOT_A_LETTER = re.compile(r"\s++(?!(?:is|was|seems|looks|appears|must|should|would|could|might)\b)[a-z]")


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
    valid = set(LETTERS[: len(options)]) if options else set(LETTERS[:10])
    rules = _letter_rules(len(options))
    key = _choice_key(reference, options)
    text = clean(text)
    said = []  # (letter, or None for a statement naming several options)
    for s in statements(text):
        m = rules.at_statement.match(s)
        if m:
            hedged = rules.hedge.match(s, m.end()) is not None
            said.append((None if hedged else next(g for g in m.groups() if g).upper(), sentence(s)))
        elif options:
            hits = _option_hits(sentence(s), options)
            if hits:
                said.append((hits.pop() if len(hits) == 1 else None, sentence(s)))
    if said:
        letters = sorted({v for v, _ in said if v})
        if said[-1][0] is None:
            return Reading(bound(said[-1][1]), False, True)
        if len(letters) >= 2:
            return Reading(",".join(letters), False, True)
        return Reading(letters[0], letters[0] == key, True)
    prose = without_questions(text, question)
    letters = set()
    for m in deque(rules.prose.finditer(prose), maxlen=256):  # the last 256 mentions
        letter = m.group(1)
        if letter not in valid or NEGATED.search(prose, max(0, m.start() - 24), m.start()):
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
