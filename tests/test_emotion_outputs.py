"""What the demo reports beyond the transfer job: the transplant matrix and its sections of summary.md."""

from __future__ import annotations

import pytest

from contrans_tl.analyses._emotion_outputs import confusion_table, emotion_summary


def _counts() -> dict:
    # happiness transfers (40 of 50 answered "happy"); surprise was answered "surprised" already unsteered (a push)
    return {"transplanted": {"happiness": {"happiness": 40, "surprise": 10}, "surprise": {"happiness": 0, "surprise": 50}},
            "unsteered": {"happiness": {"happiness": 1, "surprise": 49}, "surprise": {"happiness": 5, "surprise": 45}}}


def test_transplant_matrix_rows_and_diagonal_share():
    conf = confusion_table(_counts())
    assert conf["transplanted"]["counts"]["happiness"] == {"happiness": 40, "surprise": 10}
    assert conf["transplanted"]["diagonal_share"] == pytest.approx((40 + 50) / 100)
    assert conf["unsteered"]["diagonal_share"] == pytest.approx((1 + 45) / 100)


def test_summary_sections_render_the_matrix_fig5_and_samples():
    result = {"confusion": confusion_table(_counts()),
              "n_examples": {"happiness": {"10": {"token_acc": 0.1, "logit_acc": 0.4}}},
              "samples": {"max_new_tokens": 4, "opener": "Bridges carry",
                          "emotions": {"happiness": {"scenario": "Scenario: x", "unsteered": {"answer": "sad.", "opener": "a"},
                                                     "transplanted": {"answer": "happy|\n", "opener": "b"}}}}}
    text = emotion_summary(result)
    assert "| happiness | **40** | 10 |" in text and "diagonal share transplanted 0.90, unsteered 0.46" in text
    assert "n=10: 0.10 / 0.40" in text
    assert "`happy/ ⏎`" in text  # table-safe: pipes and newlines escaped
