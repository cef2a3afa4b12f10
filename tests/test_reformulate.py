from __future__ import annotations

import numpy as np
import pytest
import torch

import contrans_tl as ct
from contrans_tl.datasets import neutral_sentences
from contrans_tl.reformulate import default_layer_pairs, r2_score, ridge_solve


def test_default_pairs_by_relative_depth():
    assert default_layer_pairs(30, 18)[-1] == (29, 17)
    assert default_layer_pairs(4, 2) == [(1, 0), (3, 1)]
    assert default_layer_pairs(2, 2) == [(0, 0), (1, 1)]


def test_batched_solve_equals_numpy_lstsq_per_pair():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(3, 40, 5, generator=g, dtype=torch.float64)
    w, b = ridge_solve(x, y, ridge=0.0, bias=False)
    assert torch.all(b == 0)
    for p in range(3):
        ref = np.linalg.lstsq(x[p].numpy(), y[p].numpy(), rcond=None)[0]
        np.testing.assert_allclose(w[p].numpy(), ref, rtol=1e-8, atol=1e-10)
    # with a bias: numpy on [x, 1]
    w, b = ridge_solve(x, y, ridge=0.0, bias=True)
    for p in range(3):
        aug = np.concatenate([x[p].numpy(), np.ones((40, 1))], axis=1)
        ref = np.linalg.lstsq(aug, y[p].numpy(), rcond=None)[0]
        np.testing.assert_allclose(w[p].numpy(), ref[:-1], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(b[p].numpy(), ref[-1], rtol=1e-7, atol=1e-9)


def test_ridge_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 30, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, 30, 3, generator=g, dtype=torch.float64)
    w, _ = ridge_solve(x, y, ridge=0.5, bias=False)
    for p in range(2):
        xp = x[p].numpy()
        lam = 0.5 * np.mean(np.linalg.svd(xp, compute_uv=False) ** 2)
        ref = np.linalg.solve(xp.T @ xp + lam * np.eye(4), xp.T @ y[p].numpy())
        np.testing.assert_allclose(w[p].numpy(), ref, rtol=1e-8)


def test_underdetermined_gives_min_norm():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 5, 12, generator=g, dtype=torch.float64)
    y = torch.randn(1, 5, 2, generator=g, dtype=torch.float64)
    w, _ = ridge_solve(x, y, bias=False)
    ref = np.linalg.pinv(x[0].numpy()) @ y[0].numpy()
    np.testing.assert_allclose(w[0].numpy(), ref, rtol=1e-6, atol=1e-9)
    assert torch.allclose(r2_score(x, y, w, torch.zeros(1, 2, dtype=torch.float64)), torch.ones(1, dtype=torch.float64))


def test_self_map_is_identity(tiny_llama):
    texts = neutral_sentences()[:120]
    amap = ct.fit_map(tiny_llama, tiny_llama, texts, ridge=0.0)
    assert amap.provenance["alignment"] == "tokens"
    assert (amap.r2_heldout > 0.999).all()
    v = ct.refine(tiny_llama, ["a sunny day", "a fine gift"], ["the rain", "lost keys"])
    mapped = amap.apply(v)
    assert torch.allclose(mapped.vectors, v.vectors, atol=1e-3 * float(v.vectors.abs().max()))
    assert mapped.model == v.model and mapped.method == "mapped"


def test_cross_model_map_records_provenance(tiny_llama, tiny_llama_b, tmp_path):
    texts = neutral_sentences()[:60]
    amap = ct.fit_map(tiny_llama, tiny_llama_b, texts, alignment="words")
    assert amap.pairs == default_layer_pairs(2, 3)
    assert amap.weight.shape == (3, 64, 48)
    assert amap.r2_heldout.shape == (3,) and torch.isfinite(amap.r2_heldout).all()
    v = ct.refine(tiny_llama, ["a sunny day"], ["the rain"])
    mapped = amap.apply(v)
    assert mapped.vectors.shape == (3, 48)
    assert mapped.provenance["corpus_hash"] == amap.provenance["corpus_hash"]
    loaded = ct.AffineMap.load(amap.save(tmp_path / "m.safetensors"))
    assert torch.equal(loaded.weight, amap.weight) and loaded.pairs == amap.pairs
    assert torch.equal(loaded.ridge, amap.ridge)


def test_map_rejects_vector_of_other_model(tiny_llama, tiny_llama_b):
    amap = ct.fit_map(tiny_llama, tiny_llama_b, neutral_sentences()[:30], alignment="words")
    wrong = ct.refine(tiny_llama_b, ["a sunny day"], ["the rain"])
    with pytest.raises(ct.WidthMismatchError, match="width 48"):
        amap.apply(wrong)


def test_too_few_samples_warns_with_numbers(tiny_llama, tiny_llama_b):
    with pytest.warns(UserWarning, match=r"\d+ training samples for source width 64"):
        ct.fit_map(tiny_llama, tiny_llama_b, neutral_sentences()[:4], alignment="words", ridge=0.0)


def test_auto_ridge_beats_plain_least_squares_when_overfitting():
    g = torch.Generator().manual_seed(3)
    from contrans_tl.pairing import PairedStates
    from contrans_tl.models import ModelIdentity

    n, d = 300, 60
    x = torch.randn(n, 1, d, generator=g)
    w = torch.randn(d, 8, generator=g) / d**0.5
    y = (x[:, 0] @ w + 2.0 * torch.randn(n, 8, generator=g))[:, None]
    idx = torch.arange(n)  # one sample per text
    src = PairedStates(x, idx, (0,), ModelIdentity("a", None, 1, d), "c", "words")
    tgt = PairedStates(y, idx, (0,), ModelIdentity("b", None, 1, 8), "c", "words")
    auto = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge="auto")
    plain = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge=0.0)
    assert float(auto.ridge[0]) > 0
    assert float(auto.r2_heldout[0]) > float(plain.r2_heldout[0])


def test_empty_corpus_rejected(tiny_llama):
    with pytest.raises(ct.EmptyPromptsError, match="non-empty corpus"):
        ct.fit_map(tiny_llama, tiny_llama, [])
