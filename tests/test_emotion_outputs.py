"""What the demo reports from its cells: the transplant matrix, intervals and which rows are measurable."""

from __future__ import annotations

import pytest

from contrans_tl.analyses._emotion_outputs import confusion, headline, measurability, summary_markdown

LABELS = ("happiness", "surprise")


def _m(acc: float, counts: dict[str, int]) -> dict:
    n = sum(counts.values())
    return {"token_acc": 0.0, "logit_acc": acc, "n": n, "label_counts": counts}


def _result() -> dict:
    # happiness transfers (40/50 vs random 2/150); surprise is a push (random 150/150 also answers "surprised")
    results = {
        "happiness": {
            "mapped": {"0": {"negatives": _m(0.02, {"happiness": 1, "surprise": 49}), "positives": _m(1, {"happiness": 4, "surprise": 0})},
                       "0.5": {"negatives": _m(0.8, {"happiness": 40, "surprise": 10}), "positives": _m(1, {"happiness": 4, "surprise": 0})}},
            "native": {"0.5": {"negatives": _m(1.0, {"happiness": 50, "surprise": 0})}},
            "random": {"0.5": {"negatives": _m(2 / 150, {"happiness": 2, "surprise": 148}), "seeds": [{}, {}, {}]}},
        },
        "surprise": {
            "mapped": {"0": {"negatives": _m(0.9, {"happiness": 5, "surprise": 45}), "positives": _m(1, {"happiness": 0, "surprise": 4})},
                       "0.5": {"negatives": _m(1.0, {"happiness": 0, "surprise": 50}), "positives": _m(1, {"happiness": 0, "surprise": 4})}},
            "native": {"0.5": {"negatives": _m(1.0, {"happiness": 0, "surprise": 50})}},
            "random": {"0.5": {"negatives": _m(1.0, {"happiness": 0, "surprise": 150}), "seeds": [{}, {}, {}]}},
        },
    }
    result = {"alpha": 0.5, "results": results, "headline": headline(results, 0.5)}
    result["confusion"] = confusion(results, 0.5)
    result["measurability"] = measurability(result)
    return result


def test_transplant_matrix_rows_and_diagonal_share():
    conf = _result()["confusion"]
    assert conf["transplanted"]["counts"]["happiness"] == {"happiness": 40, "surprise": 10}
    assert conf["transplanted"]["diagonal_share"] == pytest.approx((40 + 50) / 100)
    assert conf["random"]["diagonal_share"] == pytest.approx((2 + 150) / 300)
    assert conf["baseline"]["diagonal_share"] == pytest.approx((1 + 45) / 100)


def test_a_row_the_random_control_reaches_is_not_measurable():
    meas = _result()["measurability"]
    assert meas["happiness"]["measurable"] and not meas["surprise"]["measurable"]
    low, high = meas["happiness"]["transplanted"]
    assert low < 0.8 < high and meas["happiness"]["n"] == 50
    assert meas["surprise"]["random"][0] > 0.97  # 150 of 150 pooled over the three seeds


def test_summary_names_the_unmeasurable_row():
    result = _result()
    result.update(source={"name": "s"}, target={"name": "t"}, layers=[3], unit="norm", seconds=1.0,
                  selection={"how": "test"}, cosine_mapped_native={e: 0.5 for e in LABELS},
                  map={"r2_heldout": [0.5], "n_train_samples": 10})
    text = summary_markdown(result)
    assert "| surprise | 50 |" in text and "**no** |" in text
    assert "| happiness | **40** | 10 |" in text
