"""Writes math_verify_cases.jsonl: the regression cases of math-verify's own test suite, as rows of
the marker's real-format suite (model_outputs.jsonl).

Source: https://github.com/huggingface/Math-Verify, tests/ at commit
5d148cfaaf99214c2e4ffb4bc497ab042c592a7a (MIT licence: the test files' header, Copyright (c) 2024
The HuggingFace Team; the repository's LICENCE file is Apache 2.0). The cases are math-verify's
test data, read from its test files with `ast` (nothing there is imported or run).

    python tests/data/marker/make_math_verify_cases.py [MIRROR] [--files test_all.py,...]

MIRROR: a clone or bare git directory of Math-Verify (default: the local mirror below); the files
are read from its HEAD with `git show` (the script prints that commit: regenerate from the one above).

A case is one `pytest.mark.parametrize` tuple `(gold, pred, expected, ...)`, or one
`assert compare_strings(...) == expected` with literal arguments; commented-out cases are not cases,
and neither are asserts on sympy objects. Each row: `id`, `format` ("math-verify"), `kind`
(`numeric` where the gold is a plain number, else `math`), `completion` (pred), `reference`
(gold), `choices` (null), `finish_reason` ("stop"), `expected` (the test's expected value, as
written), `correct` (bool(expected), but for the `OVERRIDES` below), `note` (the test's comment
above the case, or why `correct` differs), `source` ("math-verify tests/<file>::<test function>")
and `excluded`: null, or why the case's expected value is a property of math-verify's parser
configuration rather than of the answer as a careful grader reads it (`excluded` below); excluded
rows are kept, and not counted in the agreement.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import subprocess
from pathlib import Path

MIRROR = Path("/work/.mirror/huggingface+Math-Verify/repo")
FILES = ("test_all.py", "test_numina_cases.py", "test_open_thoughts.py", "test_boxed.py", "test_yujianll.py", "test_strict.py",
         "test_string_extraction.py")
OUT = Path(__file__).resolve().parents[3] / "pipeline" / "marker" / "suites" / "math_verify_cases.jsonl"  # package data

# A plain number: sign, digits, thousands separators, a decimal point or comma; in $ delimiters a
# decimal point only (in LaTeX math a comma that groups no thousands separates values: "$-2,1$").
_PLAIN_NUMBER = re.compile(r"\s*[+-]?(?:\d{1,3}(?:[, ]\d{3})+|\d+)(?:[.,]\d+)?\s*|\s*[+-]?[.,]\d+\s*")
_PLAIN_MATH_NUMBER = re.compile(r"\$+\s*[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*\$+|\$+\s*[+-]?\.\d+\s*\$+")

# compare_strings' defaults (tests/test_all.py): a case run with another value tests that option.
DEFAULTS = {"precision": 6, "strict": True, "allow_set_relation_comp": False}
# Expectations that are a defect of math-verify's parse, not the answers' mathematics: `correct` is a
# careful grader's verdict, and `note` says why it differs from the test's `expected`.
OVERRIDES = {
    "mv-test_yujianll-test_string_extraction-09": (
        False, "math-verify's test expects 1: its parse of both sides stops at \\mathrm and reads 1; 1 - 1/e and 1 + 1/e differ"),
}
_DECIMAL = re.compile(r"\d\.\d")
# Inline math, $...$ or \(...\), with a line break inside (not $$...$$ or \[...\], display math).
_INLINE_OVER_LINES = re.compile(r"(?<![$\\])\$(?!\$)[^$]*\n[^$]*(?<!\$)\$(?!\$)|\\\((?:(?!\\\)).)*\n", re.S)
SEPARATE_LINE = "inline math split over lines: math-verify's inline-LaTeX pattern does not read it, a reader reads the answer (9)"


def excluded(file: str, case: dict) -> str | None:
    """Why a case's expectation is math-verify's configuration rather than the answer's correctness, or None."""
    if file == "test_string_extraction.py":
        return "StringExtractionConfig: asserts the list parse() extracts under a config, not a verdict against a gold"
    if case.get("strict") is False:
        return "strict=False: the non-default option that equates f(x) and f(y)"
    if "allow_set_relation_comp" in case:
        if case["allow_set_relation_comp"]:
            return "allow_set_relation_comp=True: a non-default option"
        if not case["expected"]:
            return ("allow_set_relation_comp=False: the expected 0 is the option's (a gold set against a relation); "
                    "x in [-2,7] and -2 <= x <= 7 state the same set")
    if case.get("precision", DEFAULTS["precision"]) != DEFAULTS["precision"] and _DECIMAL.search(case["gold"] + case["pred"]):
        return f"precision={case['precision']}: a rounded decimal compared at a non-default number of digits"
    if not case["expected"] and _INLINE_OVER_LINES.search(case["pred"]):
        return SEPARATE_LINE
    return None


def _value(node: ast.AST):
    """A literal, or an f-string over math's functions (test_float_precision's gold)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        if isinstance(node, ast.JoinedStr) and names <= {"math"}:
            return eval(compile(ast.Expression(node), "<case>", "eval"), {"__builtins__": {}, "math": math})  # noqa: S307
        return ast.unparse(node)


def _heading(lines: list[str], line: int) -> str | None:
    """The comment lines right above a case's first line (`line`, 1-based), up to commented-out code."""
    said, i = [], line - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        text = lines[i].strip().lstrip("#").strip()
        if not re.match(r"[A-Za-z][a-z ]", text) or re.match(r"r?[\"']", text):
            break
        said.insert(0, text)
        i -= 1
    return " ".join(said) or None


def _parametrized(func: ast.FunctionDef):
    for dec in func.decorator_list:
        if isinstance(dec, ast.Call) and ast.unparse(dec.func).endswith("mark.parametrize"):
            names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
            for elt in dec.args[1].elts:
                yield elt.lineno, dict(zip(names, (_value(v) for v in elt.elts)))


def _asserted(func: ast.FunctionDef):
    """`assert compare_strings(gold, pred, ...) == expected` with literal arguments."""
    for node in ast.walk(func):
        if not (isinstance(node, ast.Compare) and isinstance(node.left, ast.Call) and ast.unparse(node.left.func) == "compare_strings"):
            continue
        call = node.left
        try:
            case = {"gold": ast.literal_eval(call.args[0]), "pred": ast.literal_eval(call.args[1]),
                    "expected": ast.literal_eval(node.comparators[0])}
            case.update({k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg != "match_types"})
        except ValueError:
            continue
        yield node.lineno, case


def _options(func: ast.FunctionDef) -> dict:
    """compare_strings' options a test function sets to literals for all its cases (`precision=5`)."""
    out = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "compare_strings":
            for k in node.keywords:
                if k.arg in DEFAULTS and isinstance(k.value, ast.Constant):
                    out[k.arg] = k.value.value
    return out


def cases(file: str, source: str):
    """(test function, index, case fields, heading comment) for every case of one test file."""
    lines = source.splitlines()
    for func in ast.parse(source).body:
        if not isinstance(func, ast.FunctionDef) or not func.name.startswith("test"):
            continue
        found = list(_parametrized(func)) or list(_asserted(func))
        for i, (line, case) in enumerate(found):
            case = {**_options(func), **case}
            case.setdefault("expected", case.pop("result", None))
            yield func.name, i, case, _heading(lines, line)


def row(file: str, func: str, i: int, case: dict, comment: str | None) -> dict:
    """One case as a suite row (the module docstring lists its fields)."""
    stem = file.removesuffix(".py")
    if file == "test_string_extraction.py":
        gold, pred = (case["expected"][-1] if case["expected"] else ""), case["pred"]
    else:
        gold, pred = case["gold"], case["pred"]
    kind = "numeric" if _PLAIN_NUMBER.fullmatch(gold) or _PLAIN_MATH_NUMBER.fullmatch(gold.strip()) else "math"
    case_id = f"mv-{stem}-{func}-{i:02d}"
    correct, note = OVERRIDES.get(case_id, (bool(case["expected"]), comment))
    return {"id": case_id, "format": "math-verify", "kind": kind, "completion": pred, "reference": gold, "choices": None,
            "finish_reason": "stop", "correct": correct, "expected": case["expected"], "note": note,
            "source": f"math-verify tests/{file}::{func}", "excluded": excluded(file, case)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("mirror", nargs="?", type=Path, default=MIRROR, help="Math-Verify clone or bare git dir")
    parser.add_argument("--files", default=",".join(FILES), help="test files under tests/, comma-separated")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    git = ["git", "-C", str(args.mirror)]
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    rows = []
    for file in args.files.split(","):
        source = subprocess.run([*git, "show", f"HEAD:tests/{file}"], check=True, capture_output=True, text=True).stdout
        rows += [row(file, *case) for case in cases(file, source)]
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} cases ({sum(r['excluded'] is not None for r in rows)} excluded) from Math-Verify {commit} -> {args.out}")


if __name__ == "__main__":
    main()
