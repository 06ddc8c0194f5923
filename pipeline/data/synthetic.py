"""A built-in, offline benchmark: arithmetic word problems of graded difficulty (`kind: numeric`).

Deterministic by seed: `problems(split, n, seed)` returns the same rows for the same arguments, and
the rows come from one stream per (family, split, seed), so the first n rows of a longer request are
the n rows of a shorter one (validation items and later rounds' items extend the stream; they never
shift it).

Two families share the arithmetic and differ in wording:
- `arith`: the default benchmark, and the tiny models' pre-training distribution;
- `arith-reworded`: the same problems in sentences the models never saw, a second benchmark that
  measures transfer (or damage) after training on `arith`.

Each row carries a worked `solution` ("3 + 4 = 7. The answer is 7.") used only to pre-train the
tiny competitor models; the benchmark itself exposes `question` and `reference`.
"""

from __future__ import annotations

import random
from itertools import count, islice
from typing import Iterator

NAMES = ["Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "eggs"]

# Question sentences per family and problem shape.
WORDING = {
    "arith": {
        "add": "{name} has {a} {obj} and gets {b} more. How many {obj} now?",
        "sub": "{name} has {a} {obj} and gives away {b}. How many {obj} now?",
        "mul": "{name} has {a} boxes of {b} {obj}. How many {obj} in all?",
    },
    "arith-reworded": {
        "add": "A box holds {a} {obj}. {name} puts {b} more {obj} in it. How many {obj} are in the box?",
        "sub": "There are {a} {obj} on a shelf. {name} takes {b} of them. How many {obj} are left?",
        "mul": "{name} fills {a} bags with {b} {obj} each. How many {obj} is that altogether?",
    },
}
FAMILIES = tuple(WORDING)
OPS = {"add": ("+", lambda a, b: a + b), "sub": ("-", lambda a, b: a - b), "mul": ("*", lambda a, b: a * b)}


def _level(rng: random.Random, level: int) -> tuple[str, int, int]:
    """(shape, a, b) for one problem of difficulty `level`."""
    if level == 1:  # one-digit addition
        return "add", rng.randint(1, 9), rng.randint(1, 9)
    if level == 2:  # two-digit plus one-digit
        return "add", rng.randint(10, 49), rng.randint(1, 9)
    if level == 3:  # two-digit minus one-digit
        return "sub", rng.randint(10, 99), rng.randint(1, 9)
    if level == 4:  # one-digit products
        return "mul", rng.randint(2, 9), rng.randint(2, 9)
    return "add", rng.randint(10, 99), rng.randint(10, 99)  # two-digit addition with carries


LEVELS = (1, 2, 3, 4, 5)


def stream(split: str, seed: int, family: str = "arith") -> Iterator[dict]:
    """The endless problem stream of (family, split, seed), cycling through the difficulty levels;
    rows have question, reference, solution, level."""
    if family not in WORDING:
        raise ValueError(f"unknown synthetic family {family!r}; valid: {list(FAMILIES)}")
    # The arithmetic is drawn from the `arith` stream for every family: a reworded problem is the same sum.
    rng = random.Random(f"arith-{split}-{seed}")
    for i in count():
        level = LEVELS[i % len(LEVELS)]
        name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
        shape, a, b = _level(rng, level)
        sign, op = OPS[shape]
        value = op(a, b)
        yield {
            "question": WORDING[family][shape].format(name=name, obj=obj, a=a, b=b),
            "reference": str(value),
            "solution": f"{a} {sign} {b} = {value}. The answer is {value}.",
            "level": level,
        }


def problems(split: str, n: int, seed: int, family: str = "arith") -> list[dict]:
    """The first `n` problems of the (family, split, seed) stream."""
    return list(islice(stream(split, seed, family), n))
