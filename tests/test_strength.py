from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture
from contrans_tl.errors import ContransError, ModelMismatchError, WidthMismatchError
from contrans_tl.reports.strength import (
    calibrate_norms,
    guarded_sweep,
    neutral_prompts,
    raw_alpha,
    relative_strength,
)
from contrans_tl.transplant import steering_offsets
from tests.conftest import hooks_attached

POS = ["I love this sunny day", "What a wonderful gift"]
NEG = ["The rain ruined everything", "I lost my keys again"]


@pytest.fixture(scope="module")
def vector(tiny_llama):
    return ct.refine(tiny_llama, POS, NEG)


def test_neutral_prompts_drop_last_word():
    prompts = neutral_prompts(8)
    assert len(prompts) == 8 and len(set(prompts)) == 8
    assert neutral_prompts(2, texts=["one two three four five", "a b c d"]) == ["one two three four", "a b c"]


def test_calibrate_and_norm_unit_conversions(tiny_llama, vector):
    texts = neutral_prompts(10)
    cal = calibrate_norms(vector, tiny_llama, texts)
    expected = capture(tiny_llama, texts).norm(dim=-1).mean(0)
    assert torch.allclose(cal.layer_norms, expected)
    assert torch.equal(cal.vectors, vector.vectors)
    # norm units: every steered layer's offset is alpha times its mean residual norm
    rel = relative_strength(cal, 0.25, unit="norm")
    assert all(r == pytest.approx(0.25, rel=1e-5) for r in rel.values())
    # raw alpha that reproduces 0.25 norm units at layer 1
    a = raw_alpha(cal, 0.25, 1)
    raw = steering_offsets([cal], [a], layers=[1])[1]
    norm = steering_offsets([cal], [0.25], layers=[1], unit="norm")[1]
    assert torch.allclose(raw, norm, atol=1e-5)


TEXTS = ["The river runs past the old mill and turns toward the sea.", "Cooking rice takes about twenty minutes."]


def test_guarded_sweep_picks_largest_alpha_within_budget(tiny_llama, vector):
    """The sweep measures every alpha with the fluency instrument and keeps the last one before the budget breaks."""
    from contrans_tl.fluency import measure_fluency
    from contrans_tl.transplant import Steering

    full = guarded_sweep(tiny_llama, vector, alphas=[0.0, 0.05, 0.2, 1.0, 4.0], budget=1e9, texts=TEXTS)
    assert full.alphas == [0.0, 0.05, 0.2, 1.0, 4.0] and full.kl[0] == 0.0
    assert full.kl[-1] > full.kl[1] > 0  # more strength, more drift
    assert full.chosen == 4.0
    # the sweep's KL is the instrument's, not a stand-in of its own
    direct = measure_fluency(tiny_llama, TEXTS, {"a": Steering.single(vector, 0.2, None, "norm")})["a"]
    assert full.kl[2] == pytest.approx(direct.kl, rel=1e-9)
    # a budget between the 2nd and the last alpha's KL keeps the last alpha within it
    budget = (full.kl[2] + full.kl[3]) / 2
    guarded = guarded_sweep(tiny_llama, vector, alphas=[4.0, 1.0, 0.2, 0.05, 0.0], budget=budget, texts=TEXTS)
    assert guarded.chosen == 0.2 and guarded.kl[3] > budget
    assert hooks_attached(tiny_llama) == 0
    d = guarded.to_dict()
    assert d["budget"] == budget and d["unit"] == "norm" and d["layers"] == [0, 1] and d["n_tokens"] == direct.n_tokens


def test_guarded_sweep_with_metric_and_nothing_within_budget(tiny_llama, vector):
    calls = []

    def metric(model):
        calls.append(1)
        return float(len(calls))

    sweep = guarded_sweep(tiny_llama, vector, alphas=[5.0, 10.0], budget=1e-12, texts=TEXTS, metric=metric, layers=[1])
    assert sweep.chosen is None and sweep.metric == [1.0, 2.0] and sweep.metric_base == 3.0
    assert sweep.layers == [1]
    with pytest.raises(ContransError):
        guarded_sweep(tiny_llama, vector, alphas=[], budget=0.1)
    with pytest.raises(ContransError):
        guarded_sweep(tiny_llama, vector, budget=0.0)


def test_mismatch(tiny_llama_b, tiny_neox, vector):
    with pytest.raises(ModelMismatchError):
        calibrate_norms(vector, tiny_neox, ["a b c"])
    with pytest.raises(WidthMismatchError):
        guarded_sweep(tiny_llama_b, vector, texts=["a b c"])
