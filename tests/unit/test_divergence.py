"""Divergent negatives (lossaverse.pipeline.data.divergence): tokens of the target's tokenizer, not characters."""

import pyarrow as pa
import pytest

from lossaverse.pipeline.data.divergence import split_shared_prefixes
from lossaverse.pipeline.data.schemas import KTO
from lossaverse.pipeline.models.tinymodels import build_tokenizer

PROMPT = "Question: What is 6 + 4?\nAnswer:"
RIGHT = " 6 + 4 = 10. The answer is 10."
WRONG = " 6 + 4 = 11. The answer is 11."


@pytest.fixture(scope="module")
def tokenizer():
    # The tiny models' own tokenizer builder: byte-level BPE with single-digit tokens.
    texts = [PROMPT + RIGHT, PROMPT + WRONG, "Then we add. The answer is 7.", "The answer is 3. Then 4."] * 50
    return build_tokenizer(texts)


def rows(*specs):
    return pa.Table.from_pylist(
        [{"prompt": p, "completion": c, "label": l, "id": i, "competitor": "large", "sample": n}
         for n, (i, p, c, l) in enumerate(specs)], schema=KTO)


def completion_ids(tok, prompt, completion):
    full = tok(prompt + completion, add_special_tokens=False)["input_ids"]
    return full[len(tok(prompt, add_special_tokens=False)["input_ids"]):]


def test_shared_prefix_moves_into_the_prompt_on_a_token_boundary(tokenizer):
    out, counts = split_shared_prefixes(rows(("q1", PROMPT, RIGHT, True), ("q1", PROMPT, WRONG, False)), tokenizer)
    wrong = out.to_pylist()[1]
    # " 6 + 4 = 1" is shared; the first token that differs is the second digit of the sum.
    assert wrong["prompt"] == PROMPT + " 6 + 4 = 1"
    assert wrong["completion"] == "1. The answer is 11."
    assert wrong["prompt"] + wrong["completion"] == PROMPT + WRONG
    before = len(completion_ids(tokenizer, PROMPT, WRONG))
    shared = len(completion_ids(tokenizer, PROMPT, " 6 + 4 = 1"))
    assert counts == {"undesirable_rows": 1, "split_rows": 1, "penalised_tokens_before": before,
                      "penalised_tokens_after": before - shared}
    assert out.to_pylist()[0] == rows(("q1", PROMPT, RIGHT, True)).to_pylist()[0]  # desirable rows untouched


def test_tokens_not_characters_decide_the_split(tokenizer):
    # " The" and " Then" share the characters " The" but are different tokens: nothing is shared.
    assert tokenizer(" Then", add_special_tokens=False)["input_ids"][0] != tokenizer(" The", add_special_tokens=False)["input_ids"][0]
    out, counts = split_shared_prefixes(rows(("q1", PROMPT, " The answer is 10.", True), ("q1", PROMPT, " Then 11.", False)), tokenizer)
    assert out.to_pylist()[1]["prompt"] == PROMPT
    assert counts["penalised_tokens_after"] == counts["penalised_tokens_before"]


def test_rows_without_a_right_answer_to_the_same_prompt_keep_their_whole_completion(tokenizer):
    table = rows(("q1", PROMPT, RIGHT, True), ("q2", PROMPT, WRONG, False), ("q1", "Question: other\nAnswer:", WRONG, False))
    out, counts = split_shared_prefixes(table, tokenizer)
    assert out.to_pylist() == table.to_pylist()
    assert counts["split_rows"] == 0 and counts["undesirable_rows"] == 2
    assert counts["penalised_tokens_after"] == counts["penalised_tokens_before"]


def test_the_longest_shared_prefix_over_right_answers_wins_and_one_token_stays_penalised(tokenizer):
    table = rows(("q1", PROMPT, " 7.", True), ("q1", PROMPT, RIGHT, True), ("q1", PROMPT, " 6 + 4 = 1", False))
    out, counts = split_shared_prefixes(table, tokenizer)
    wrong = out.to_pylist()[2]
    # The wrong answer is a prefix of a right one: all but its last token move to the prompt.
    assert wrong["completion"] == "1" and wrong["prompt"] == PROMPT + " 6 + 4 = "
    assert counts["penalised_tokens_after"] == 1
    assert out.num_rows == table.num_rows and out.schema == table.schema
