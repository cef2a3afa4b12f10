"""The fluency instrument: KL(unsteered ‖ steered) and ΔCE per token, against a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import encode
from contrans_tl.fluency import Fluency, bootstrap_ratio, measure_fluency
from contrans_tl.transplant import Steering
from tests.conftest import hooks_attached

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["The river runs past the old mill and turns toward the sea before the town.",
         "Cooking rice takes about twenty minutes when the water boils steadily.",
         "Trains leave every hour from the north platform."]


@pytest.fixture(scope="module")
def vector(tiny_llama):
    return ct.refine(tiny_llama, ["I love this sunny day", "What a wonderful gift"],
                     ["The rain ruined everything", "I lost my keys again"])


def _direct(model, text: str, steering: Steering) -> tuple[float, float, int]:
    """Summed KL(p ‖ q) and Δ cross-entropy over one text's positions, from two unbatched forwards."""
    (ids,), _ = encode(model, [text])
    x = torch.tensor([ids])
    with torch.inference_mode():
        lp = torch.log_softmax(model(x)[0, :-1].double(), -1)
        with steering.apply(model):
            lq = torch.log_softmax(model(x)[0, :-1].double(), -1)
    target = x[0, 1:, None]
    kl = float((lp.exp() * (lp - lq)).sum())
    dce = float((lp.gather(-1, target) - lq.gather(-1, target)).sum())
    return kl, dce, len(ids) - 1


def test_kl_and_dce_equal_a_direct_computation_text_by_text(tiny_llama, vector):
    s = Steering.single(vector, 0.5, [1], "norm")
    longest = max(len(ids) for ids in encode(tiny_llama, TEXTS)[0])
    got = measure_fluency(tiny_llama, TEXTS, {"s": s, "none": None, "zero": Steering.single(vector, 0.0, [1])},
                          max_positions=longest + 1)  # no text cut into windows, but several chunks
    f = got["s"]
    direct = [_direct(tiny_llama, t, s) for t in TEXTS]
    for (kl, dce, n), fk, fd, fn in zip(direct, f.text_kl, f.text_dce, f.text_tokens):
        assert fk == pytest.approx(kl, rel=1e-3, abs=1e-6) and fd == pytest.approx(dce, rel=1e-3, abs=1e-6) and fn == n
    assert f.kl == pytest.approx(sum(d[0] for d in direct) / f.n_tokens, rel=1e-4)
    assert f.kl > 0 and f.kl_ci95[0] <= f.kl <= f.kl_ci95[1] and f.ppl_ratio == pytest.approx(math.exp(f.dce))
    assert got["none"].kl == 0 and got["zero"].kl == 0 and got["none"].n_tokens == f.n_tokens
    assert hooks_attached(tiny_llama) == 0


def test_texts_longer_than_a_window_are_scored_in_windows_with_every_token_once(tiny_llama, vector):
    s = Steering.single(vector, 0.5, [1], "norm")
    whole = measure_fluency(tiny_llama, TEXTS[:1], {"s": s}, max_positions=512)["s"]
    windowed = measure_fluency(tiny_llama, TEXTS[:1], {"s": s}, max_positions=6)["s"]
    assert windowed.n_tokens == whole.n_tokens  # each token after the first scored exactly once
    assert windowed.base_nll != pytest.approx(whole.base_nll)  # shorter contexts: the windows are real


def test_more_strength_costs_more_and_a_broken_model_is_infinite(tiny_llama, vector):
    settings = {a: Steering.single(vector, a, [1], "norm") for a in (0.1, 1.0, 1e30)}
    got = measure_fluency(tiny_llama, TEXTS, settings)
    assert 0 < got[0.1].kl < got[1.0].kl
    assert got[1e30].broken and got[1e30].kl == math.inf and got[1e30].ppl_ratio == math.inf
    back = Fluency.from_dict(got[1e30].to_dict())
    assert back.broken and back.kl == math.inf
    assert Fluency.from_dict(got[1.0].to_dict()) == got[1.0]


def test_several_steerings_in_one_setting_add_up(tiny_llama, vector):
    one = Steering.single(vector, 0.5, [1], "norm")
    got = measure_fluency(tiny_llama, TEXTS, {"double": [one, one], "twice": Steering.single(vector, 1.0, [1], "norm")})
    assert got["double"].kl == pytest.approx(got["twice"].kl, rel=1e-4)


def test_bootstrap_ratio_is_a_percentile_interval_over_items():
    low, high = bootstrap_ratio([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], n_boot=4000)
    assert 1.0 < low < 2.5 < high < 4.0
    assert bootstrap_ratio([2.0, 2.0], [1.0, 1.0]) == (2.0, 2.0)
