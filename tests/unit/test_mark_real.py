"""The marker on the output of real math and reasoning models: Minerva endings, answers stated in
prose, answer sets across several \\boxed{}, reasoning traces, chat tokens, and bounded time."""

import threading
import time

import pytest

from lossaverse.pipeline.marker.mark import grade_row

MINERVA_PROSE = "We need $n^2 < 1200$, and $34^2 = 1156$.\nFinal Answer: The largest $n$ is 34."


@pytest.mark.parametrize(
    "kind,completion,reference,correct",
    [
        # lm-eval minerva_math's format
        ("math", "So $x=-5$.\nFinal Answer: The final answer is $-5$. I hope it is correct.", "-5", True),
        ("math", "Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "\\frac34", True),
        ("numeric", "So he pays 18 dollars.\nFinal Answer: The final answer is $18$. I hope it is correct.", "18", True),
        ("numeric", "Final Answer: The final answer is $-5$. I hope it is correct.", "-5", True),
        ("numeric", "Final Answer: The final answer is $\\$18$. I hope it is correct.", "18", True),
        ("math", MINERVA_PROSE, "34", True),
        ("math", MINERVA_PROSE, "35", False),
        ("math", "Final Answer: The area of the triangle is $6\\sqrt{3}$.", "6\\sqrt3", True),
        # a box inside the reasoning, then the final stated answer: the statement counts
        ("math", "At first I thought $\\boxed{12}$, but that double counts.\nFinal Answer: The final answer is $10$. I hope it is correct.", "10", True),
        ("math", "At first I thought $\\boxed{12}$, but that double counts.\nFinal Answer: The final answer is $10$. I hope it is correct.", "12", False),
    ],
)
def test_minerva_and_prose_final_answers(kind, completion, reference, correct):
    g = grade_row(completion, reference, kind)
    assert (g.correct, g.reason) == (correct, "match" if correct else "mismatch"), g.extracted


@pytest.mark.parametrize(
    "completion,reference,correct",
    [
        ("The ordered pairs are $\\boxed{(1, 2)}, \\boxed{(2, 1)}$.", "(2,1),(1,2)", True),
        ("So $x \\in \\boxed{1},\\boxed{2},\\boxed{3}$.", "\\{1,2,3\\}", True),
        ("The solutions are $\\boxed{1}$, $\\boxed{2}$ and $\\boxed{3}$.", "1, 2, 3", True),
        ("Hence $x = 1$ or $x = -2$.\nFinal Answer: The final answer is $x=1$ and $x=-2$. I hope it is correct.", "1,-2", True),
        ("The roots are $\\boxed{1}$ and $\\boxed{-2}$.", "-2, 1", True),
        # a value missing, one too many, one wrong: a set that is not the reference's
        ("The solutions are $\\boxed{1}$ and $\\boxed{2}$.", "1, 2, 3", False),
        ("The solutions are $\\boxed{1}$, $\\boxed{2}$, $\\boxed{3}$ and $\\boxed{4}$.", "1, 2, 3", False),
        ("The ordered pairs are $\\boxed{(1, 2)}, \\boxed{(2, 2)}$.", "(2,1),(1,2)", False),
        # a single-valued reference: two answers is still hedging
        ("It is either $\\boxed{3}$ or $\\boxed{4}$.", "3", False),
        ("The point is $\\boxed{(1, 2)}, \\boxed{(2, 1)}$.", "(1,2)", False),
    ],
)
def test_answer_sets_are_decided_from_the_reference(completion, reference, correct):
    g = grade_row(completion, reference, "math")
    assert g.correct == correct, g.extracted


@pytest.mark.parametrize(
    "kind,completion,reference,finish,expected",
    [
        ("math", "<think>\nMaybe $\\boxed{5}$? No: 3 + 4 = 7.\n</think>\n\nThe answer is $\\boxed{7}$.", "7", "stop", (True, "match")),
        ("math", "<think>\nMaybe $\\boxed{5}$? No: 3 + 4 = 7.\n</think>\n\nThe answer is $\\boxed{7}$.", "5", "stop", (False, "mismatch")),
        ("numeric", "Okay, so 3 + 4 = 7, the answer is 5? No.\n</think>\n\nThe answer is 7.", "7", "stop", (True, "match")),
        ("numeric", "Okay, so 3 + 4 = 7, the answer is 5? No.\n</think>\n\nThe answer is 7.", "5", "stop", (False, "mismatch")),
        # cut inside the trace: a tentative box is no final answer
        ("math", "<think>\nLet me try $\\boxed{5}$ first and check it against", "5", "length", (False, "truncated")),
        # chat end tokens: the model's own next turn is not its answer
        ("numeric", "The answer is 7.<|im_end|>\n<|im_start|>user\nWhat about 8? The answer is 8.", "7", "stop", (True, "match")),
        ("numeric", "The answer is 7.<|im_end|>\n<|im_start|>user\nWhat about 8? The answer is 8.", "8", "stop", (False, "mismatch")),
        ("math", "$\\boxed{7}$<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n$\\boxed{8}$", "7", "stop", (True, "match")),
        ("choice", "The answer is (B).<|im_end|><|im_start|>user\nThe answer is (C).", "B", "stop", (True, "match")),
        # escaped dollars are currency, not math delimiters
        ("math", "It costs \\$12 a day for \\$3 days, so the total is $\\boxed{\\$36}$.", "36", "stop", (True, "match")),
        ("math", "He had \\$5 and got \\$7 more, so he has \\$12.", "12", "stop", (True, "match")),
        # a digit inside a word is no answer
        ("numeric", "The code on the box reads AZYUK5A.", "5", "stop", (False, "no_answer")),
        ("numeric", "Its serial is XK55B and nothing else is printed.", "5", "stop", (False, "no_answer")),
    ],
)
def test_traces_chat_tokens_dollars_and_words(kind, completion, reference, finish, expected):
    choices = ["0", "4", "2", "6"] if kind == "choice" else None
    g = grade_row(completion, reference, kind, choices, finish)
    assert (g.correct, g.reason) == expected, g.extracted


@pytest.mark.parametrize("dots", [40, 60, 200, 10_000])
def test_numeric_rules_take_linear_time_on_runs_of_dots(dots):
    """Once ~1.6x per extra dot: 38 dots took 3.6 s, 60 would take hours. (CPU time of this thread,
    so that other load on the machine does not count.)"""
    start = time.thread_time()
    g = grade_row("I got 3 " + "." * dots + "x 4", "4", "numeric")
    assert time.thread_time() - start < 0.05
    assert g.reason in ("match", "mismatch")


def test_math_verify_is_bounded_by_the_row_budget_in_a_thread():
    """signal.alarm works only in the main thread; the row budget holds in any thread. Unbounded,
    math-verify takes over 20 s on this expansion."""
    out = {}

    def mark():
        start = time.perf_counter()
        out["graded"] = grade_row("$\\boxed{(x+1)^{3000}}$", "x^2+1", "math", timeout_s=1)
        out["seconds"] = time.perf_counter() - start

    worker = threading.Thread(target=mark)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the row budget did not stop math-verify"
    g = out["graded"]
    assert (g.correct, g.reason, g.undecided) == (False, "mismatch", True)
    assert out["seconds"] < 5  # a 1 s budget, and a loaded machine


def test_the_row_budget_leaves_the_thread_usable_afterwards():
    def two_rows():
        grade_row("$\\boxed{(x+1)^{3000}}$", "x^2+1", "math", timeout_s=1)
        return grade_row("$\\boxed{(x+1)^2}$", "x^2+2x+1", "math", timeout_s=5)

    result = []
    worker = threading.Thread(target=lambda: result.append(two_rows()))
    worker.start()
    worker.join(timeout=30)
    assert result and result[0].correct and result[0].marked_by == "math-verify"


@pytest.mark.parametrize("answer", ["10^{10^{10}}", "9^{9^{9}}", "(x+1)^{100000000}", "100000!", "\\binom{10000000}{500000}"])
def test_what_sympy_would_compute_in_c_is_never_sent_to_math_verify(answer):
    """No budget stops C code: 9^{9^{9}} once hung the marker for good."""
    start = time.thread_time()
    g = grade_row(f"$\\boxed{{{answer}}}$", "5", "math", timeout_s=1)
    assert (g.correct, g.undecided) == (False, True) and time.thread_time() - start < 0.5


def test_the_real_format_suite_is_marked_as_a_careful_grader_marks_it():
    """pipeline/marker/suites/model_outputs.jsonl, package data (`lossaverse bench mark` reports it against math-verify too)."""
    import json

    from lossaverse.pipeline.bench.markbench import SUITE

    rows = [json.loads(line) for line in SUITE.read_text().splitlines()]
    assert len(rows) >= 150 and len({r["format"] for r in rows}) >= 10
    wrong = [r["id"] for r in rows if grade_row(r["completion"], r["reference"], r["kind"], r["choices"], r["finish_reason"]).correct != r["correct"]]
    assert wrong == []
