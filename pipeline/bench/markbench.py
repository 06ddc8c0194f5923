"""The marker's speed and memory benchmark (`lossaverse bench mark`): rows/s per kind on one core.

`bench_mark` generates realistic `answers` rows per kind (`generate_answers_table`: the forms models
really use, right and wrong, empty, cut and failed rows, in fixed proportions, deterministic by
seed), marks them with `lossaverse.pipeline.marker.mark.mark_table` in streamed batches, and measures in the same run
math-verify's `parse` + `verify` on a subset of the same `numeric` rows as the baseline, with the
agreement of the two verdicts on the rows both decide. Peak RSS is taken in a fresh process per row
count, so a flat figure shows memory does not grow with the number of rows.

    lossaverse bench mark configs/local.yaml --rows 100000 --repeats 3
"""

from __future__ import annotations

import importlib.resources
import json
import multiprocessing
import os
import random
import resource
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from lossaverse.pipeline.bench.measure import Timer, ratio, spread
from lossaverse.pipeline.data.schemas import ANSWERS
from lossaverse.pipeline.marker.mark import grade_row, mark_table
from lossaverse.pipeline.marker.marktext import cut_new_turn

NAMES = ["Janet", "Natalia", "Weng", "Betty", "Julie", "James", "Albert", "Ken", "Alexis", "Tina"]
THINGS = ["clips", "eggs", "pages", "letters", "pizzas", "cookies", "marbles", "dollars", "apples", "miles"]
MATH_ANSWERS = [
    ("\\frac{3}{4}", ["\\frac{3}{4}", "\\dfrac{3}{4}", "0.75", "\\frac{6}{8}"], ["\\frac{4}{3}", "\\frac{1}{4}"]),
    ("2\\sqrt{5}", ["2\\sqrt{5}", "2 \\sqrt{5}"], ["\\sqrt{5}", "5\\sqrt{2}"]),
    ("16\\pi", ["16\\pi", "16 \\pi"], ["8\\pi", "32\\pi"]),
    ("x^2+2x+1", ["x^2+2x+1", "x^2 + 2x + 1"], ["x^2+1", "x^2-2x+1"]),
    ("(-\\infty,3]", ["(-\\infty, 3]", "(-\\infty,3]"], ["(-\\infty,3)", "[3,\\infty)"]),
    ("\\text{Tuesday}", ["\\text{Tuesday}", "\\text{ Tuesday}"], ["\\text{Monday}"]),
]
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima")]


def _numeric(rng: random.Random) -> tuple[str, str, str, str | None]:
    """(completion, reference, finish_reason, error) in GSM8K's style."""
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    ref = a * b + rng.randint(0, 9) * 1000 * (rng.random() < 0.1)
    value = ref if rng.random() < 0.6 else ref + rng.choice([-10, -1, 1, 2, 10])
    work = f"{name} has {a} boxes with {b} {thing} each. So {name} has {a} * {b} = {a * b} {thing}."
    shown = f"{value:,}" if value >= 1000 and rng.random() < 0.5 else str(value)
    style = rng.random()
    if style < 0.40:
        text = f"{work} The answer is {shown}."
    elif style < 0.55:
        text = f"{work}\n#### {shown}"
    elif style < 0.72:
        text = f"{name} has {a} boxes with {b} {thing} each.\n{a} * {b} = {shown}"
    elif style < 0.77:
        text = f"{work} In total {name} has {shown} {thing} left."
    elif style < 0.81:
        text = f"{work} So the answer is $\\boxed{{{shown}}}$."
    elif style < 0.84:
        text = f"{work} The answer is ${shown}.00."
    elif style < 0.88:
        return f"{name} has {a} boxes with {b} {thing}", str(ref), "length", None
    elif style < 0.91:
        return "", str(ref), "stop", None
    elif style < 0.93:
        return "", str(ref), "error", "engine error: out of KV cache"
    elif style < 0.96:
        text = f"Question: {name} has {a} boxes with {b} {thing} each. How many?\nAnswer: {a} * {b} = {shown}. The answer is {shown}."
    else:
        text = f"{work} The answer is {shown}.\n\nQuestion: {rng.choice(NAMES)} has {b} {thing}. How many?\nAnswer: The answer is {b}."
    return text, str(ref), "stop", None


def _math_hard(rng: random.Random) -> tuple[str, str]:
    """(reference, answer) equal only symbolically: these rows need math-verify. Drawn at random so
    math-verify's parse caches do not make repeats cheaper than a real run."""
    k, m = rng.randint(2, 60), rng.choice([2, 3, 5, 6, 7, 10, 11])
    if rng.random() < 0.5:
        return f"{k}\\sqrt{{{m}}}", f"\\sqrt{{{k * k * m}}}"
    return f"x^2+{2 * k}x+{k * k}", f"(x+{k})^2"


def _math(rng: random.Random) -> tuple[str, str, str, str | None]:
    if rng.random() < 0.02:
        ref, said = _math_hard(rng)
        return f"Simplifying, we get $\\boxed{{{said}}}$.", ref, "stop", None
    ref, right, wrong = rng.choice(MATH_ANSWERS)
    said = rng.choice(right if rng.random() < 0.6 else wrong)
    style = rng.random()
    if style < 0.6:
        return f"Working through the algebra carefully, the result is $\\boxed{{{said}}}$.", ref, "stop", None
    if style < 0.85:
        return f"So the final answer is ${said}$.", ref, "stop", None
    if style < 0.92:
        return "Let us expand the expression and collect", ref, "length", None
    return "", ref, "stop", None


def _choice(rng: random.Random) -> tuple[str, str, str, str | None, list]:
    options = ["0", "4", "2", "6"]
    key = rng.choice("ABCD")
    said = key if rng.random() < 0.5 else rng.choice("ABCD")
    style = rng.random()
    if style < 0.4:
        text = f"The answer is ({said})."
    elif style < 0.6:
        text = said
    elif style < 0.75:
        text = f"I think {said}"
    elif style < 0.85:
        text = f"Answer: {said}. The others do not fit."
    elif style < 0.9:
        text = "A or C"
    elif style < 0.95:
        return "", key, "stop", None, options
    else:
        text = "Let us consider each option in"
        return text, key, "length", None, options
    return text, key, "stop", None, options


def _exact(rng: random.Random) -> tuple[str, str, str, str | None]:
    country, city = rng.choice(CAPITALS)
    said = city if rng.random() < 0.6 else rng.choice(CAPITALS)[1]
    style = rng.random()
    if style < 0.5:
        return f"The capital of {country} is well known. The answer is {said}.", city, "stop", None
    if style < 0.8:
        return said, city, "stop", None
    if style < 0.9:
        return f"Answer: {said.lower()}", city, "stop", None
    return "", city, "stop", None


def generate_answers_table(kind: str, rows: int, seed: int = 0) -> pa.Table:
    """`rows` generated answers rows of one kind, following the answers contract."""
    rng = random.Random(f"markbench-{kind}-{seed}")
    cols: dict[str, list] = {name: [] for name in ANSWERS.names}
    for i in range(rows):
        choices = None
        if kind == "numeric":
            comp, ref, finish, error = _numeric(rng)
        elif kind == "math":
            comp, ref, finish, error = _math(rng)
        elif kind == "choice":
            comp, ref, finish, error, choices = _choice(rng)
        elif kind == "exact":
            comp, ref, finish, error = _exact(rng)
        else:
            raise ValueError(f"unknown kind {kind!r}; valid: ['choice', 'exact', 'math', 'numeric']")
        row = {"id": f"{kind}-{i}", "question": "q", "reference": ref, "kind": kind, "choices": choices, "split": "train",
               "source": "markbench", "competitor": "large" if i % 2 else "small", "model": "generated", "sample": 0,
               "prompt": "p", "completion": comp, "finish_reason": finish, "completion_tokens": len(comp) // 4, "error": error}
        for name in ANSWERS.names:
            cols[name].append(row[name])
    return pa.table(cols, schema=ANSWERS)


@contextmanager
def one_core():
    """Pin this process (and Arrow's thread pool) to one CPU while measuring."""
    before_cpus = pa.cpu_count()
    before_affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    pa.set_cpu_count(1)
    if before_affinity:
        os.sched_setaffinity(0, {min(before_affinity)})
    try:
        yield
    finally:
        pa.set_cpu_count(before_cpus)
        if before_affinity:
            os.sched_setaffinity(0, before_affinity)


def _batches(table: pa.Table, batch_size: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, batch_size):
        yield table.slice(start, batch_size)


def _rows_per_s(table: pa.Table, batch_size: int, repeats: int, timeout_s: int) -> dict:
    mark_table(table.slice(0, min(batch_size, table.num_rows)), timeout_s)  # warm-up (imports, regex caches)
    rates, cpu_rates = [], []
    for _ in range(repeats):
        with Timer() as t:
            for batch in _batches(table, batch_size):
                mark_table(batch, timeout_s)
        rates.append(table.num_rows / t.wall)
        cpu_rates.append(table.num_rows / t.cpu)
    return {"rows": table.num_rows, "rows_per_s": {**spread(rates), "runs": rates},
            "rows_per_cpu_s": {**spread(cpu_rates), "runs": cpu_rates}}


def row_rules_rate(table: pa.Table, timeout_s: int = 5) -> dict:
    """The same rules as a plain per-row Python loop (`grade_row`), without the vectorised path."""
    names = ["completion", "reference", "kind", "choices", "finish_reason", "error", "question"]
    cols = table.select(names).to_pydict()
    worst = 0.0
    with Timer() as t:
        for c, r, k, ch, f, e, q in zip(*(cols[n] for n in names)):
            row = time.perf_counter()
            grade_row(c, r, k, ch, f, e, timeout_s, q)
            worst = max(worst, time.perf_counter() - row)
    return {"rows": table.num_rows, "rows_per_s": {"median": table.num_rows / t.wall},
            "rows_per_cpu_s": {"median": table.num_rows / t.cpu}, "worst_row_s": worst}


def math_verify_baseline(table: pa.Table, ours: pa.Table) -> dict:
    """math-verify `parse(completion)` + `verify(parse(reference), ...)` on the rows of `table`,
    and the agreement with our verdicts (`ours`, the marked rows) on rows both decide: rows with a
    completion and no error that math-verify parsed and we marked `match` / `mismatch`."""
    from math_verify import parse, verify  # deferred: math-verify loads in seconds


    comps, refs = table["completion"].to_pylist(), table["reference"].to_pylist()
    errors = table["error"].to_pylist()
    for comp, ref in list(zip(comps, refs))[:20]:  # warm-up: math-verify's first calls load its grammars
        verify(parse(f"${ref}$"), parse(comp or "0"))
    verdicts = []
    with Timer() as t:
        for comp, ref, err in zip(comps, refs, errors):
            if err or not comp:
                verdicts.append(None)
                continue
            answer = parse(comp)
            verdicts.append(bool(verify(parse(f"${ref}$"), answer)) if answer else None)
    both = agree = new_turn = 0
    examples = []
    for mv, correct, reason, comp, ref in zip(verdicts, ours["correct"].to_pylist(), ours["reason"].to_pylist(), comps, refs):
        if mv is None or reason not in ("match", "mismatch"):
            continue
        both += 1
        if mv == correct:
            agree += 1
            continue
        # By design: math-verify reads the answer to a question the model went on to write itself.
        new_turn += cut_new_turn(comp) != comp.lstrip()
        if len(examples) < 5:
            examples.append({"completion": comp[-200:], "reference": ref, "math_verify": mv, "rules": correct})
    return {"name": "math-verify parse + verify", "rows": table.num_rows, "rows_per_s": {"median": table.num_rows / t.wall},
            "rows_per_cpu_s": {"median": table.num_rows / t.cpu}, "both_decide": both, "agree": agree, "disagree": both - agree, "disagree_new_turn": new_turn, "disagreements": examples}


# Package data (lossaverse.pipeline.marker.suites): in the wheel as in the source tree; tests read the same files.
SUITE = importlib.resources.files("lossaverse.pipeline.marker.suites") / "model_outputs.jsonl"
MATH_VERIFY_SUITE = importlib.resources.files("lossaverse.pipeline.marker.suites") / "math_verify_cases.jsonl"


def _math_verify_verdict(completion: str, reference: str) -> bool | None:
    """math-verify on the full completion, as its users call it; None where it parsed nothing."""
    from math_verify import parse, verify  # deferred: math-verify loads in seconds

    try:
        answer = parse(completion, parsing_timeout=5)
        return bool(verify(parse(f"${reference}$", parsing_timeout=5), answer, timeout_seconds=5)) if answer else None
    except Exception:  # noqa: BLE001 - sympy raises many types; all mean "no verdict"
        return None


def suite_agreement(path: Path = SUITE, timeout_s: float = 5) -> dict:
    """The marker and math-verify (on the full completion) against a careful grader's verdicts on the
    suite of real-format model outputs (the package data pipeline/marker/suites/model_outputs.jsonl, made by tests/data/marker/make_model_outputs.py).

    `rules`: agreement with the grader, and `false_right` (marked right where the grader says wrong);
    `math_verify`: the same for math-verify (no verdict counts as wrong); `disagreements`: every row
    where the two differ, with the grader's verdict and why (the row's format note); `worst_row_s`:
    the slowest row of the marker."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    grade_row("$\\boxed{x+1}$", "x+2", "math")  # math-verify's first call loads its grammars: not a row's time
    ours, theirs, worst = [], [], (0.0, None)
    for r in rows:
        start = time.perf_counter()
        g = grade_row(r["completion"], r["reference"], r["kind"], r["choices"], r["finish_reason"], None, timeout_s)
        seconds = time.perf_counter() - start
        worst = max(worst, (seconds, r["id"]))
        ours.append(g.correct)
        theirs.append(bool(_math_verify_verdict(r["completion"], r["reference"])))
    labels = [r["correct"] for r in rows]
    disagreements = []
    for r, a, b in zip(rows, ours, theirs):
        if a != b:
            wrong = "math-verify" if a == r["correct"] else "rules"
            disagreements.append({"id": r["id"], "format": r["format"], "grader": r["correct"], "rules": a, "math_verify": b,
                                  "wrong": wrong, "why": f"{wrong} wrong on {r['format']}: {r['note']}"})

    def score(verdicts):
        agree = sum(v == lab for v, lab in zip(verdicts, labels))
        return {"agree": agree, "agreement": agree / len(rows), "false_right": sum(v and not lab for v, lab in zip(verdicts, labels))}

    return {"rows": len(rows), "formats": sorted({r["format"] for r in rows}), "rules": score(ours), "math_verify": score(theirs),
            "rules_vs_math_verify": 1 - len(disagreements) / len(rows), "disagreements": disagreements,
            "worst_row_s": worst[0], "worst_row": worst[1]}


def math_verify_suite_agreement(path: Path = MATH_VERIFY_SUITE, timeout_s: float = 5) -> dict:
    """The marker against math-verify's own regression suite (its tests/ cases as rows,
    pipeline/marker/suites/math_verify_cases.jsonl, made by tests/data/marker/make_math_verify_cases.py).

    `rows`: every case; `excluded`: how many are left out, by reason (an expectation that is
    math-verify's parser configuration, not the answer's correctness); on the rest (`graded`):
    `agreement` with `correct` (math-verify's expectation; a careful grader's where the row's note
    says math-verify's is a defect of its parse, `overridden`), `agreement_math_verify` with the
    expectation as its tests write it, `false_positives` (ids marked right where `correct` is
    false), `disagreements` (every row the marker gets wrong, with its source and note) and the
    slowest row of the marker (`worst_row_s`, `worst_row`)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    graded = [r for r in rows if r["excluded"] is None]
    excluded: dict[str, int] = {}
    for r in rows:
        if r["excluded"] is not None:
            excluded[r["excluded"]] = excluded.get(r["excluded"], 0) + 1
    grade_row("$\\boxed{x+1}$", "x+2", "math")  # math-verify's first call loads its grammars: not a row's time
    verdicts, worst = [], (0.0, None)
    for r in graded:
        start = time.perf_counter()
        verdicts.append(grade_row(r["completion"], r["reference"], r["kind"], r["choices"], r["finish_reason"], None, timeout_s).correct)
        worst = max(worst, (time.perf_counter() - start, r["id"]))
    wrong = [(r, v) for r, v in zip(graded, verdicts) if v != r["correct"]]
    return {"rows": len(rows), "excluded": sum(excluded.values()), "excluded_by_reason": excluded, "graded": len(graded),
            "agree": len(graded) - len(wrong), "agreement": 1 - len(wrong) / len(graded),
            "agreement_math_verify": sum(v == bool(r["expected"]) for r, v in zip(graded, verdicts)) / len(graded),
            "overridden": sum(r["correct"] != bool(r["expected"]) for r in graded),
            "false_positives": [r["id"] for r, v in wrong if v], "false_negatives": [r["id"] for r, v in wrong if not v],
            "disagreements": [{"id": r["id"], "source": r["source"], "correct": r["correct"], "rules": v, "note": r["note"]}
                              for r, v in wrong],
            "worst_row_s": worst[0], "worst_row": worst[1]}


def hostile_rows() -> list[tuple[str, str, str, str, list | None]]:
    """(name, kind, completion, reference, choices): text made to be slow, up to about a megabyte."""
    mb = 1_000_000
    texts = {
        "dots": "I got 3 " + "." * 60 + "x 4", "dots_mb": "I got 3 " + "." * mb + "x 4", "question_marks": "?" * mb,
        "newlines": "\n" * mb + "Question: x", "thousands": ",000" * (mb // 4) + "0", "hashes": "#### " * (mb // 5),
        "open_boxes": "\\boxed{" * (mb // 7), "open_parens_math": "\\(" * (mb // 2), "nested_boxes": "\\boxed{" * 3000 + "2" + "}" * 3000,
        "statements": "".join(f"The answer is {i}. " for i in range(mb // 20)), "letters": "A B C D " * (mb // 8),
        "scripts": "Привет 世界 مرحبا ٣ 5 😀 " * (mb // 30), "think_open": "<think>" + "1 " * (mb // 2), "power_tower": "$\\boxed{9^{9^{9}}}$",
    }
    kinds = [("numeric", "5", None), ("math", "(1,2),(2,1)", None), ("math", "\\frac{1}{2}", None), ("choice", "B", ["0", "4", "2", "6"]),
             ("exact", "Paris", None)]
    return [(name, kind, text, ref, choices) for name, text in texts.items() for kind, ref, choices in kinds]


def hostile_worst(timeout_s: float = 5) -> dict:
    """The slowest row (CPU seconds of the marking thread, and wall) of `hostile_rows`."""
    grade_row("$\\boxed{x+1}$", "x+2", "math")  # math-verify's first call loads its grammars
    worst = {"cpu_s": 0.0, "wall_s": 0.0, "row": None}
    for name, kind, text, ref, choices in hostile_rows():
        wall, cpu = time.perf_counter(), time.thread_time()
        grade_row(text, ref, kind, choices, "stop", None, timeout_s, "What is 2 + 3?")
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if cpu > worst["cpu_s"]:
            worst = {"cpu_s": cpu, "wall_s": wall, "row": f"{name} ({kind}, {len(text):,} chars)"}
    return {"rows": len(hostile_rows()), **worst}


def _rss_child(kind: str, rows: int, seed: int, batch_size: int, queue) -> None:
    done = 0
    while done < rows:  # generate and mark batch by batch: nothing is kept between batches
        n = min(batch_size, rows - done)
        mark_table(generate_answers_table(kind, n, seed + done))
        done += n
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_rss(kind: str, rows: int, seed: int = 0, batch_size: int = 8192) -> int:
    """Peak RSS in bytes of a fresh process that generates and marks `rows` rows in batches."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_rss_child, args=(kind, rows, seed, batch_size, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def bench_mark(rows: int = 100_000, repeats: int = 3, seed: int = 0, kinds=("numeric", "math", "choice", "exact"),
               baseline_rows: int = 2_000, batch_size: int = 8192, timeout_s: int = 5, math_rows: int = 10_000,
               rss: bool = True) -> dict:
    """The marker's figures on one core, all measured in this one run.

    kinds.<kind>.rows_per_s: median / min / max over `repeats` timed passes (a warm-up batch first,
    not timed), and the same per CPU-second (`rows_per_cpu_s`, robust to other load on the machine);
    `math` rows are capped at `math_rows` (2% of them need math-verify's symbolic check).
    baseline: math-verify's parse + verify on the first `baseline_rows` numeric rows, and on those
    rows the agreement of its verdicts with ours where both decide; `ratio` = numeric median /
    baseline median. row_rules: the same rules as a plain per-row loop. worst_row_s: the slowest
    row per kind (per-row loop over generated rows); hostile: the slowest row (CPU and wall) on text
    made to be slow (`hostile_rows`); suite: agreement with a careful grader and with math-verify on
    real-format model outputs (`suite_agreement`), every disagreement and why; math_verify_suite:
    agreement with math-verify's own test cases, exclusions and false positives
    (`math_verify_suite_agreement`). peak_rss_bytes: a fresh
    process marking rows/10 and rows numeric rows in streamed batches (flat = memory does not grow).
    """
    out: dict = {"rows": rows, "repeats": repeats, "seed": seed, "batch_size": batch_size, "kinds": {}}
    with one_core():
        for kind in kinds:
            n = min(rows, math_rows) if kind == "math" else rows
            out["kinds"][kind] = _rows_per_s(generate_answers_table(kind, n, seed), batch_size, repeats, timeout_s)
        subset = generate_answers_table("numeric", min(baseline_rows, rows), seed)
        out["baseline"] = math_verify_baseline(subset, mark_table(subset, timeout_s))
        out["row_rules"] = row_rules_rate(generate_answers_table("numeric", min(rows, 20_000), seed), timeout_s)
        out["worst_row_s"] = {kind: row_rules_rate(generate_answers_table(kind, min(rows, 2_000), seed), timeout_s)["worst_row_s"]
                              for kind in kinds}
        out["suite"] = suite_agreement(timeout_s=timeout_s)
        out["math_verify_suite"] = math_verify_suite_agreement(timeout_s=timeout_s)
        out["hostile"] = hostile_worst(timeout_s)
    if "numeric" in out["kinds"]:
        numeric = out["kinds"]["numeric"]
        out["ratio"] = ratio(numeric["rows_per_s"]["median"], out["baseline"]["rows_per_s"]["median"])
        out["ratio_cpu"] = ratio(numeric["rows_per_cpu_s"]["median"], out["baseline"]["rows_per_cpu_s"]["median"])
        out["ratio_vs_row_rules"] = ratio(numeric["rows_per_s"]["median"], out["row_rules"]["rows_per_s"]["median"])
    if rss:
        small = max(1, rows // 10)
        out["peak_rss_bytes"] = {small: peak_rss("numeric", small, seed, batch_size), rows: peak_rss("numeric", rows, seed, batch_size)}
        out["peak_rss_growth_mib"] = (out["peak_rss_bytes"][rows] - out["peak_rss_bytes"][small]) / 2**20
    return out

