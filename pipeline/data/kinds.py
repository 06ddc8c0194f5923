"""The benchmark kinds: one registry. Each kind names how its items are asked (the prompt template),
how its reference answer is stated as a training completion (the form the template asks the model
to answer in, and the marker reads first), and the marker's grader for it.

Adding a kind is one `register(Kind(...))` and its grader function; every lookup by kind (the
config's `benchmark.kind`, the prompt templates, the reference completions, the marker, `/mark`'s
validation) reads this registry when it is called. The grader is named as "module:function" and
resolved by the marker (lossaverse.pipeline.marker.mark.grader_for), which sits above this package.
"""

from __future__ import annotations

from dataclasses import dataclass

_MARK = "lossaverse.pipeline.marker.mark"


@dataclass(frozen=True)
class Kind:
    name: str
    template: str        # the raw prompt: a str.format string over question, options and kind
    reference_form: str  # the reference stated as an answer: a str.format string over reference
    grader: str          # "module:function": (text, reference, choices, question, timeout_s) -> Reading
    graded_as: str = ""  # what the grader compares, in words


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add `kind` to the registry; ValueError if its name is taken or its grader is not "module:function"."""
    if kind.name in KINDS:
        raise ValueError(f"benchmark kind {kind.name!r} is already registered")
    module, _, function = kind.grader.partition(":")
    if not module or not function:
        raise ValueError(f"kind {kind.name!r}: grader {kind.grader!r} is not \"module:function\"")
    KINDS[kind.name] = kind
    return kind


for _kind in (
    Kind("numeric", "Question: {question}\nAnswer:", " The answer is {reference}.",
         f"{_MARK}:grade_numeric", "the final number, by value"),
    Kind("math", "Question: {question}\nPut the final answer in \\boxed{{}}.\nAnswer:",
         " The answer is $\\boxed{{{reference}}}$.", f"{_MARK}:grade_math",
         "the final expression, symbolically (math-verify)"),
    Kind("choice", "Question: {question}\n{options}\nAnswer with the letter of the correct option.\nAnswer:",
         " The answer is ({reference}).", f"{_MARK}:grade_choice", "the chosen option's letter (or its text)"),
    Kind("exact", "Question: {question}\nAnswer:", " The answer is {reference}.",
         f"{_MARK}:grade_exact", "the final answer's text, normalised"),
):
    register(_kind)


def kind_of(name: str) -> Kind:
    """The registered kind `name`; ValueError naming the valid ones."""
    if name not in KINDS:
        raise ValueError(f"unknown benchmark kind {name!r}; valid: {sorted(KINDS)}")
    return KINDS[name]
