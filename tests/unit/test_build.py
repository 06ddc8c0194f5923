import pyarrow as pa
import pyarrow.compute as pc

from lossaverse.pipeline.data.build import build_datasets, recommended_weights
from lossaverse.pipeline.data.schemas import KTO, MARKED, PAIRS


def _row(item, competitor, sample, correct, completion="x", error=None):
    return dict(id=item, question="q", reference="1", kind="numeric", choices=None, split="train", source="t",
                competitor=competitor, model=f"m-{competitor}", sample=sample, prompt=f"P{item}",
                completion=completion, finish_reason="stop", completion_tokens=1, error=error,
                correct=correct, extracted="1" if correct else None, reason="match" if correct else "mismatch",
                marked_by="rules")


def test_datasets_from_marked_rows():
    rows = [
        _row("a", "large", 0, True, "right a"),
        _row("a", "small", 0, False, "wrong a"),
        _row("b", "large", 0, True, "right b"),
        _row("b", "small", 0, True, "right b2"),
        _row("c", "large", 0, False, "wrong c"),
        _row("c", "small", 0, False, "", error="engine died"),
    ]
    out = build_datasets(pa.Table.from_pylist(rows, schema=MARKED))
    kto, pairs, negatives, stats = out["kto"], out["pairs"], out["negatives"], out["stats"]
    assert kto.schema == KTO and pairs.schema == PAIRS
    # The error row has no completion to learn from: kept in negatives, left out of kto.
    assert kto.num_rows == 5 and negatives.num_rows == 3
    assert kto["label"].to_pylist().count(True) == 3
    assert pairs.to_pylist() == [
        {"prompt": "Pa", "chosen": "right a", "rejected": "wrong a", "id": "a", "chosen_competitor": "large", "rejected_competitor": "small"}
    ]
    assert stats["competitors"]["large"]["accuracy"] == 2 / 3
    assert stats["competitors"]["small"]["reasons"]["mismatch"] == 2
    agreement = stats["agreement"]
    assert {k: agreement[k] for k in ("both_right", "large_only", "small_only", "both_wrong")} == {
        "both_right": 1, "large_only": 1, "small_only": 0, "both_wrong": 1}
    assert agreement["mcnemar_p"] == 1.0  # one discordant pair: p = 2 * 1/2
    assert agreement["accuracy_diff"]["diff"] == 1 / 3
    assert stats["labels"] == {"desirable": 3, "undesirable": 2, "total": 5, "desirable_fraction": 0.6, "reference_rows": 0}
    assert stats["excluded_from_kto"] == 1
    assert stats["reasons"]["error"] == 0 and stats["reasons"]["match"] == 3 and stats["reasons"]["mismatch"] == 3
    lo, hi = stats["competitors"]["large"]["ci95_wilson"]
    assert lo < 2 / 3 < hi
    assert stats["competitors"]["large"]["items"] == 3


def test_recommended_weights_put_ratio_in_paper_range():
    w = recommended_weights(n_desirable=100, n_undesirable=300)
    ratio = w["desirable_weight"] * 100 / (w["undesirable_weight"] * 300)
    assert 1.0 <= ratio <= 4 / 3 and w["ratio"] == round(ratio, 4)
    assert recommended_weights(0, 10) is None


def test_reference_rows_only_for_items_nobody_got_right_and_only_when_asked():
    rows = [
        _row("a", "large", 0, True, "right a"),
        _row("a", "small", 0, False, "wrong a"),
        _row("c", "large", 0, False, "wrong c"),
        _row("c", "small", 0, False, "wrong c2"),
        _row("c", "small", 1, False, "", error="engine died"),
    ]
    marked = pa.Table.from_pylist(rows, schema=MARKED)
    assert "reference" not in build_datasets(marked)["kto"]["competitor"].to_pylist()
    out = build_datasets(marked, with_reference=True)
    ref = out["kto"].filter(pc.equal(out["kto"]["competitor"], "reference")).to_pylist()
    # One row for item c (one distinct prompt), none for a; the reference stated in the prompt's form.
    assert ref == [{"prompt": "Pc", "completion": " The answer is 1.", "label": True, "id": "c", "competitor": "reference", "sample": 0}]
    assert out["stats"]["labels"]["reference_rows"] == 1 and out["stats"]["labels"]["desirable"] == 2
    # The reference row is not an answer: it is not counted as one more answer excluded or included.
    assert out["stats"]["excluded_from_kto"] == 1
    assert "reference" not in out["stats"]["competitors"]


def test_training_rows_carry_the_targets_prompt_and_negatives_what_each_competitor_saw():
    rows = [_row("a", "large", 0, True, "right a"), _row("a", "small", 0, False, "wrong a"),
            _row("b", "small", 0, False, "wrong b")]
    rows[0]["prompt"] = "<chat>Pa"  # the large competitor got its chat template, the small one raw text
    out = build_datasets(pa.Table.from_pylist(rows, schema=MARKED), prompt_of=lambda r: f"T[{r['id']}:{r['question']}]")
    assert set(out["kto"]["prompt"].to_pylist()) == {"T[a:q]", "T[b:q]"}
    assert out["pairs"]["prompt"].to_pylist() == ["T[a:q]"]
    assert sorted(out["negatives"]["prompt"].to_pylist()) == ["Pa", "Pb"]
