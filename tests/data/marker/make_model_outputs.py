"""Writes model_outputs.jsonl: answers in the formats real math and reasoning models produce, each
with the verdict a careful grader gives (`correct`) and what the format does (`note`).

    python tests/data/marker/make_model_outputs.py

Formats: lm-eval's minerva_math ending ("Final Answer: The final answer is $X$. I hope it is
correct.") and prose endings, R1-style <think> traces, OpenThoughts' begin/end_of_thought with
several boxes, lm-eval's GSM8K (gold "#### X", chain-of-thought "The answer is X.") and MATH
(hendrycks_math "$\\boxed{X}$") formats, chat turns that run on past <|im_end|>, escaped dollars.
The texts are written for this suite from those formats, not copied from any model's output.
"""

import json
from pathlib import Path

# (question's reference, a right answer as written, a wrong answer as written)
MATH = [
    ("\\frac{3}{4}", "\\frac{3}{4}", "\\frac{4}{3}"),
    ("-5", "-5", "5"),
    ("2\\sqrt{5}", "\\sqrt{20}", "5\\sqrt{2}"),
    ("16\\pi", "16\\pi", "8\\pi"),
    ("(-\\infty, 3]", "(-\\infty,3]", "(-\\infty,3)"),
    ("x^2+2x+1", "(x+1)^2", "x^2+1"),
    ("34", "34", "35"),
    ("\\frac{1}{2}", "0.5", "\\frac{1}{3}"),
]
SETS = [
    ("(2,1),(1,2)", ["(1, 2)", "(2, 1)"], ["(1, 2)", "(2, 2)"]),
    ("\\{1,2,3\\}", ["1", "2", "3"], ["1", "2"]),
    ("1, -2", ["1", "-2"], ["-1", "2"]),
    ("-3, 3", ["3", "-3"], ["3"]),
]
GSM = [("72", "48 + 24"), ("10", "0.2 * 50"), ("5", "100 - 95"), ("1,250", "1000 + 250"), ("18", "9 * 2"), ("-4", "3 - 7")]

rows = []


def add(fmt, kind, completion, reference, correct, note, finish="stop"):
    rows.append({"id": f"{fmt}-{len(rows):03d}", "format": fmt, "kind": kind, "completion": completion, "reference": reference,
                 "choices": None, "finish_reason": finish, "correct": correct, "note": note})


for ref, right, wrong in MATH:
    for said, ok in ((right, True), (wrong, False)):
        add("minerva", "math", f"We simplify step by step; the intermediate value is $7$.\nFinal Answer: The final answer is ${said}$. I hope it is correct.",
            ref, ok, "lm-eval minerva_math ending")
        add("minerva_after_box", "math", f"A first attempt gives $\\boxed{{{wrong if ok else right}}}$, but that drops a case.\n"
            f"Final Answer: The final answer is ${said}$. I hope it is correct.", ref, ok, "an earlier box in the reasoning, then the stated final answer")
        add("minerva_prose", "math", f"Checking each case in turn settles it.\nFinal Answer: The value we want is ${said}$.", ref, ok,
            "Final Answer: followed by a sentence, the value after its last 'is'")
        add("math_boxed", "math", f"Combining the two cases, we get $\\boxed{{{said}}}$.", ref, ok, "hendrycks_math / MATH-500 boxed answer")
        add("r1_think", "math", f"<think>\nLet me try $\\boxed{{{wrong if ok else right}}}$ first... no, recheck: 3 + 4 = 7.\nSo it is {said}.\n</think>\n\n"
            f"To solve this we combine the cases.\n\n**Final Answer**\n\\[\n\\boxed{{{said}}}\n\\]", ref, ok,
            "R1-style trace with a tentative box inside <think>, the final box after </think>")
        add("chat_runon", "math", f"So the answer is $\\boxed{{{said}}}$.<|im_end|>\n<|im_start|>user\nAnd if it were doubled?<|im_end|>\n"
            f"<|im_start|>assistant\nThen it is $\\boxed{{2({wrong if ok else right})}}$.", ref, ok,
            "a chat model writes the user's next turn and answers it after <|im_end|>")
add("r1_think", "math", "<think>\nLet me try $\\boxed{34}$ first and check it against the constraint n^2 < 1200, so", "34", False,
    "cut by the token limit inside <think>: a tentative box is no final answer", finish="length")
add("minerva_prose", "math", "We need $n^2 < 1200$, and $34^2 = 1156$ while $35^2 = 1225$.\nFinal Answer: The largest $n$ is 34.", "34", True,
    "Minerva prose ending")
add("minerva_prose", "math", "We need $n^2 < 1200$, and $34^2 = 1156$ while $35^2 = 1225$.\nFinal Answer: The largest $n$ is 35.", "34", False,
    "Minerva prose ending")

for ref, right, wrong in SETS:
    for values, ok in ((right, True), (wrong, False)):
        boxes = ", ".join(f"\\boxed{{{v}}}" for v in values)
        add("openthoughts_multibox", "math", f"<|begin_of_thought|>\nTry each pair in turn, checking both equations.\n<|end_of_thought|>\n\n"
            f"<|begin_of_solution|>\nThe solutions are \\({boxes}\\).\n<|end_of_solution|>", ref, ok, "several boxes, one per value of a set reference")
        listed = " and ".join(f"$x = {v}$" for v in values)
        add("minerva_set", "math", f"Factoring gives the roots.\nFinal Answer: The final answer is {listed}. I hope it is correct.", ref, ok,
            "the values of a set reference listed in the final statement")
add("openthoughts_multibox", "math", "The answer is $\\boxed{3}$ or $\\boxed{4}$.", "3", False, "a single-valued reference: two boxes joined by 'or' is hedging")

for ref, work in GSM:
    plain = ref.replace(",", "")
    wrong = str(int(plain) + 1)
    for said, ok in ((ref, True), (wrong, False)):
        add("gsm8k_gold", "numeric", f"She has {work} = <<{work}={said}>>{said} in all.\n#### {said}", ref, ok, "lm-eval gsm8k's gold format")
        add("gsm8k_cot", "numeric", f"First, {work} = {said}. The answer is {said}.\n\nQuestion: Tom has 3 pens. How many?\nAnswer: The answer is 3.",
            ref, ok, "gsm8k-cot few-shot: the model writes the next question itself")
        add("minerva", "numeric", f"Working it out, {work} = {said}.\nFinal Answer: The final answer is ${said}$. I hope it is correct.", ref, ok,
            "Minerva ending on a numeric item")
        add("r1_think", "numeric", f"<think>\nMaybe it is {int(plain) + 7}? No: {work} = {said}.\n</think>\n\nThe answer is $\\boxed{{{said}}}$.",
            ref, ok, "R1-style trace with another number in it")
        add("escaped_dollars", "numeric", f"She pays \\$3 and then \\$2 more, in all {work}.\nFinal Answer: The final answer is $\\${said}$. I hope it is correct.",
            ref, ok, "escaped dollars in the reasoning and the answer")
        add("chat_runon", "numeric", f"{work} = {said}, so the answer is {said}.<|im_end|><|im_start|>user\nThanks! What is 1 + 1?<|im_end|>"
            f"<|im_start|>assistant\nThe answer is 2.", ref, ok, "the model answers a turn it wrote itself after <|im_end|>")
add("word_digit", "numeric", "The code printed on the crate is AZYUK5A.", "5", False, "a digit inside a word is not an answer")
add("word_digit", "numeric", "The serial number is XK55B, so the crate is the fifth one.", "5", False, "a digit inside a word is not an answer")

if __name__ == "__main__":
    out = Path(__file__).resolve().parents[3] / "pipeline" / "marker" / "suites" / "model_outputs.jsonl"  # package data
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")
