from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture
from contrans_tl.refine import mean_difference, pca_difference

POS = ["I love this sunny day", "What a wonderful gift", "The party was great fun"]
NEG = ["The rain ruined everything", "I lost my keys again", "The train was late", "Nothing worked"]


def test_refine_is_mean_difference_of_captures(tiny_llama):
    v = ct.refine(tiny_llama, POS, NEG, batch_size=2)
    expected = capture(tiny_llama, POS).mean(0) - capture(tiny_llama, NEG).mean(0)
    assert torch.allclose(v.vectors, expected, atol=1e-5)
    assert v.layers == tuple(range(tiny_llama.cfg.n_layers))
    assert v.n_prompts == 7 and v.method == "mean_diff"
    assert v.layer_norms is not None and (v.layer_norms > 0).all()


def test_pca_recovers_planted_direction():
    torch.manual_seed(0)
    direction = torch.randn(8)
    direction /= direction.norm()
    neg = torch.randn(50, 2, 8) * 0.1
    scale = torch.rand(50, 1, 1) * 3 + 1
    pos = neg + scale * direction
    got = pca_difference(pos, neg)
    cos = torch.nn.functional.cosine_similarity(got, direction.expand(2, 8), dim=-1)
    assert (cos > 0.99).all()  # also checks the sign points from negative to positive
    assert torch.allclose(got.norm(dim=-1), mean_difference(pos, neg).norm(dim=-1), rtol=0.05)


def test_pca_needs_pairs(tiny_llama):
    with pytest.raises(ct.InvalidArgumentError, match="method='pca'.*3 positives and 4 negatives"):
        ct.refine(tiny_llama, POS, NEG, method="pca")


@pytest.mark.parametrize("pos,neg,name", [([], NEG, "positive"), (POS, [], "negative")])
def test_empty_lists_rejected(tiny_llama, pos, neg, name):
    with pytest.raises(ct.EmptyPromptsError, match=f"^{name}: no prompts"):
        ct.refine(tiny_llama, pos, neg)


def test_concept_from_states_equals_refine_and_checks_shapes(tiny_llama):
    pos, neg = capture(tiny_llama, POS), capture(tiny_llama, NEG)
    from_states = ct.concept_from_states(tiny_llama, pos, neg)
    refined = ct.refine(tiny_llama, POS, NEG)
    assert torch.allclose(from_states.vectors, refined.vectors, atol=1e-6)
    assert torch.allclose(from_states.layer_norms, refined.layer_norms, atol=1e-5)
    assert from_states.n_prompts == refined.n_prompts and from_states.model == refined.model
    with pytest.raises(ct.InvalidArgumentError, match="positive/negative"):
        ct.concept_from_states(tiny_llama, pos[:, :1], neg[:, :1])  # one layer, not every layer
    with pytest.raises(ct.InvalidArgumentError, match="at least one state"):
        ct.concept_from_states(tiny_llama, pos[:0], neg)
