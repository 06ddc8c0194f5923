"""The benchmark kinds: one registry. Each kind names how its items are asked (the prompt template)
and how its reference answer is stated as a training completion (the form the template asks the
model to answer in, and the marker reads first).

Adding a kind is one entry here and its grader in lossaverse.pipeline.marker.mark.GRADERS (the
marker sits above this package); tests/unit/test_kinds.py checks that the two name the same kinds,
and the config's `benchmark.kind` is checked against this registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    name: str
    template: str        # the raw prompt: a str.format string over question, options and kind
    reference_form: str  # the reference stated as an answer: a str.format string over reference
    graded_as: str       # what the marker compares (documentation; the grader is the marker's)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("numeric", "Question: {question}\nAnswer:", " The answer is {reference}.",
         "the final number, by value"),
    Kind("math", "Question: {question}\nPut the final answer in \\boxed{{}}.\nAnswer:",
         " The answer is $\\boxed{{{reference}}}$.", "the final expression, symbolically (math-verify)"),
    Kind("choice", "Question: {question}\n{options}\nAnswer with the letter of the correct option.\nAnswer:",
         " The answer is ({reference}).", "the chosen option's letter (or its text)"),
    Kind("exact", "Question: {question}\nAnswer:", " The answer is {reference}.",
         "the final answer's text, normalised"),
)}


def kind_of(name: str) -> Kind:
    """The registered kind `name`; ValueError naming the valid ones."""
    if name not in KINDS:
        raise ValueError(f"unknown benchmark kind {name!r}; valid: {sorted(KINDS)}")
    return KINDS[name]
