"""A built-in, offline benchmark: arithmetic word problems of graded difficulty (`kind: numeric`).

Deterministic by seed: `problems(split, n, seed)` returns the same rows for the same arguments.
Each row carries a worked `solution` ("3 + 4 = 7. The answer is 7.") used only to pre-train the
tiny competitor models; the benchmark itself exposes `question` and `reference`.
"""

from __future__ import annotations

import random

NAMES = ["Ann", "Ben", "Cat", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo"]
OBJECTS = ["apples", "books", "coins", "pens", "cards", "shells", "stamps", "eggs"]


def _level(rng: random.Random, level: int) -> tuple[str, str, int]:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    if level == 1:  # one-digit addition
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        return f"{name} has {a} {obj} and gets {b} more. How many {obj} now?", f"{a} + {b}", a + b
    if level == 2:  # two-digit plus one-digit
        a, b = rng.randint(10, 49), rng.randint(1, 9)
        return f"{name} has {a} {obj} and gets {b} more. How many {obj} now?", f"{a} + {b}", a + b
    if level == 3:  # two-digit minus one-digit
        a, b = rng.randint(10, 99), rng.randint(1, 9)
        return f"{name} has {a} {obj} and gives away {b}. How many {obj} now?", f"{a} - {b}", a - b
    if level == 4:  # one-digit products
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return f"{name} has {a} boxes of {b} {obj}. How many {obj} in all?", f"{a} * {b}", a * b
    # two-digit addition with carries
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{name} has {a} {obj} and gets {b} more. How many {obj} now?", f"{a} + {b}", a + b


LEVELS = (1, 2, 3, 4, 5)


def problems(split: str, n: int, seed: int) -> list[dict]:
    """`n` problems for `split`, cycling through the difficulty levels; rows have
    question, reference, solution, level."""
    rng = random.Random(f"arith-{split}-{seed}")
    rows = []
    for i in range(n):
        level = LEVELS[i % len(LEVELS)]
        question, expr, value = _level(rng, level)
        rows.append(
            {
                "question": question,
                "reference": str(value),
                "solution": f"{expr} = {value}. The answer is {value}.",
                "level": level,
            }
        )
    return rows
