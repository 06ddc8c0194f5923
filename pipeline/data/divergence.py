"""Divergence-aware negatives: penalise a wrong answer only from where it departs from a right one.

A wrong answer to an arithmetic item usually repeats most of a right answer ("6 + 4 = 1" ...) and
goes wrong at one token. KTO's undesirable term lowers the log-likelihood of the whole completion,
so it also lowers the shared, correct tokens (likelihood displacement: Razin et al., 2024,
arXiv 2410.08847; DPOP/Smaug, Pal et al., 2024, arXiv 2402.13228). Our data has what those methods
lack: right and wrong answers to the same prompt. `split_shared_prefixes` moves the longest token
prefix a wrong completion shares with any right completion of the same (item, prompt) into the
prompt, so TRL's KTO loss (which scores completion tokens only) sees just the divergent part.

Contract: kto rows in == kto rows out, same columns; desirable rows and wrong rows with no right
answer on the same (id, prompt) are unchanged; for a split row, prompt + completion is unchanged
character for character. Tokens are the target's (the trainer's) tokenizer's, over
prompt + completion tokenized together, as TRL tokenizes them; the split lands on a token boundary,
and at least one completion token always stays penalised.
"""

from __future__ import annotations

from collections import defaultdict

import pyarrow as pa


def _completion_tokens(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(token ids, character start in `completion`) of the completion's tokens, tokenized in context.

    A token that straddles the prompt/completion boundary counts as the prompt's (TRL does the same:
    the completion starts where the tokenized prompt and prompt+completion diverge)."""
    enc = tokenizer(prompt + completion, add_special_tokens=False, return_offsets_mapping=True)
    ids, starts = [], []
    for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if start >= len(prompt):
            ids.append(tok)
            starts.append(start - len(prompt))
    return ids, starts


def _shared(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_shared_prefixes(kto: pa.Table, tokenizer) -> tuple[pa.Table, dict]:
    """Return (kto rows with shared prefixes moved into the prompt, counts).

    counts: `undesirable_rows`, `split_rows` (wrong rows that had a right answer to compare with),
    `penalised_tokens_before` and `penalised_tokens_after` (completion tokens of undesirable rows).
    """
    rows = kto.to_pylist()
    right: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
    tokens: list[tuple[list[int], list[int]] | None] = []
    for row in rows:
        tokens.append(_completion_tokens(tokenizer, row["prompt"], row["completion"]))
        if row["label"]:
            right[(row["id"], row["prompt"])].append(tokens[-1][0])
    before = after = split = undesirable = 0
    for row, (ids, starts) in zip(rows, tokens):
        if row["label"]:
            continue
        undesirable += 1
        before += len(ids)
        rights = right.get((row["id"], row["prompt"]))
        keep = min((max(_shared(ids, r) for r in rights) if rights else 0), max(len(ids) - 1, 0))
        if rights:
            split += 1
        if keep:
            cut = starts[keep]
            row["prompt"], row["completion"] = row["prompt"] + row["completion"][:cut], row["completion"][cut:]
        after += len(ids) - keep
    counts = {"undesirable_rows": undesirable, "split_rows": split,
              "penalised_tokens_before": before, "penalised_tokens_after": after}
    return pa.Table.from_pylist(rows, schema=kto.schema), counts
