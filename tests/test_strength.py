from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture
from contrans_tl.errors import ContransError, ModelMismatchError, WidthMismatchError
from contrans_tl.reports.strength import (
    calibrate_norms,
    guarded_sweep,
    kl_divergence,
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


def test_kl_divergence_basic():
    a = torch.randn(3, 11)
    assert torch.allclose(kl_divergence(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    b = a.clone()
    b[:, 0] += 3
    kl = kl_divergence(b, a)
    p, q = torch.softmax(b.double(), -1), torch.softmax(a.double(), -1)
    assert torch.allclose(kl, (p * (p / q).log()).sum(-1))


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


def test_guarded_sweep_picks_largest_alpha_within_budget(tiny_llama, vector):
    prompts = neutral_prompts(6)
    full = guarded_sweep(tiny_llama, vector, alphas=[0.0, 0.05, 0.2, 1.0, 4.0], budget=1e9, prompts=prompts)
    assert full.alphas == [0.0, 0.05, 0.2, 1.0, 4.0]
    assert full.kl_mean[0] == pytest.approx(0.0, abs=1e-9)
    assert full.kl_mean[-1] > full.kl_mean[1] > 0  # more strength, more drift
    assert full.chosen == 4.0 and not full.stopped_early
    # a budget between the 2nd and the last alpha's KL stops there and keeps the one before
    budget = (full.kl_mean[2] + full.kl_mean[3]) / 2 if full.kl_mean[3] > full.kl_mean[2] else full.kl_mean[2] * 1.01
    guarded = guarded_sweep(tiny_llama, vector, alphas=[4.0, 1.0, 0.2, 0.05, 0.0], budget=budget, prompts=prompts)
    assert guarded.chosen is not None and guarded.chosen <= 1.0
    over = [a for a, kl in zip(guarded.alphas, guarded.kl_mean) if kl > budget]
    assert over and guarded.alphas[-1] == over[0] and guarded.stopped_early
    assert all(kl <= budget for a, kl in zip(guarded.alphas, guarded.kl_mean) if a <= guarded.chosen)
    assert hooks_attached(tiny_llama) == 0
    d = guarded.to_dict()
    assert d["budget"] == budget and d["unit"] == "norm" and d["layers"] == [0, 1]


def test_guarded_sweep_with_metric_and_nothing_within_budget(tiny_llama, vector):
    calls = []

    def metric(model):
        calls.append(1)
        return float(len(calls))

    sweep = guarded_sweep(tiny_llama, vector, alphas=[5.0, 10.0], budget=1e-12, prompts=neutral_prompts(4),
                          metric=metric, layers=[1])
    assert sweep.chosen is None and sweep.alphas == [5.0] and sweep.metric == [2.0] and sweep.metric_base == 1.0
    assert sweep.layers == [1]
    with pytest.raises(ContransError):
        guarded_sweep(tiny_llama, vector, alphas=[], budget=0.1)
    with pytest.raises(ContransError):
        guarded_sweep(tiny_llama, vector, budget=0.0)


def test_mismatch(tiny_llama_b, tiny_neox, vector):
    with pytest.raises(ModelMismatchError):
        calibrate_norms(vector, tiny_neox, ["a b c"])
    with pytest.raises(WidthMismatchError):
        guarded_sweep(tiny_llama_b, vector, prompts=["a b c"])
