from __future__ import annotations

import numpy as np
import pytest
import torch

import contrans_tl as ct
from contrans_tl.datasets import neutral_sentences
from contrans_tl.models import ModelIdentity
from contrans_tl.pairing import PairedStates
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


def _synthetic_states(x: torch.Tensor, y: torch.Tensor, per_text: int = 1) -> tuple[PairedStates, PairedStates]:
    """PairedStates of made-up source/target samples ``[n, layer, d]``, ``per_text`` samples per text."""
    idx = torch.arange(x.shape[0]) // per_text

    def states(name: str, s: torch.Tensor) -> PairedStates:
        model = ModelIdentity(name, None, s.shape[1], s.shape[2])
        return PairedStates(s, idx, tuple(range(s.shape[1])), model, "corpus", "words")

    return states("src", x), states("tgt", y)


@pytest.mark.parametrize("ridge", [0.0, "auto"])
def test_fit_recovers_a_known_affine_map(ridge):
    """target = source[layer 1] @ W + b + noise: the fit returns W and b, and held-out R² is the
    noise level's ‖W‖² / (‖W‖² + d_tgt·σ²) (unit-variance sources); source layer 0 is unrelated."""
    g = torch.Generator().manual_seed(0)
    n, d_src, d_tgt = 2000, 8, 5
    x = torch.randn(n, 2, d_src, generator=g)
    w = torch.randn(d_src, d_tgt, generator=g)
    b = 3 * torch.randn(d_tgt, generator=g)
    for sigma, w_tol in ((0.05, 0.02), (1.0, 0.2)):
        y = (x[:, 1] @ w + b + sigma * torch.randn(n, d_tgt, generator=g))[:, None]
        src, tgt = _synthetic_states(x, y, per_text=2)
        amap = ct.fit_map_from_states(src, tgt, layers=[(1, 0), (0, 0)], ridge=ridge)
        assert amap.provenance["n_heldout_samples"] == 400  # a fifth of the 1000 texts, both samples each
        assert torch.allclose(amap.weight[0], w, atol=w_tol)
        assert torch.allclose(amap.bias[0], b, atol=w_tol)
        theory = float(w.square().sum() / (w.square().sum() + d_tgt * sigma**2))
        assert float(amap.r2_heldout[0]) == pytest.approx(theory, abs=0.01)
        assert float(amap.r2_train[0]) == pytest.approx(theory, abs=0.01)
        assert abs(float(amap.r2_heldout[1])) < 0.02  # the unrelated source layer predicts nothing
    assert float(amap.r2_heldout[0]) < 0.95  # the noisy case really sits below 1
    # a mapped concept vector is a difference of states: W applies, the bias does not
    single = ct.fit_map_from_states(src, tgt, layers=[(1, 0)], ridge=ridge)
    v = ct.ConceptVector(vectors=torch.randn(2, d_src, generator=g), model=src.model, layers=(0, 1),
                         method="mean_diff")
    assert torch.allclose(single.apply(v).vectors[0], v.vectors[1] @ w, atol=0.2 * float(v.vectors[1].norm()))


def test_ridge_beats_least_squares_out_of_sample_near_square_noisy_system():
    """48 training samples for 40 source dimensions and noise as large as the signal: plain least
    squares fits the noise (held-out R² far below 0), a ridge keeps a positive R²."""
    g = torch.Generator().manual_seed(0)
    n, d_src, d_tgt = 60, 40, 4
    x = torch.randn(n, 1, d_src, generator=g)
    w = torch.randn(d_src, d_tgt, generator=g) / d_src**0.5
    y = (x[:, 0] @ w + torch.randn(n, d_tgt, generator=g))[:, None]  # signal and noise: unit variance each
    src, tgt = _synthetic_states(x, y)
    plain = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge=0.0)
    fixed = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge=1.0)
    auto = ct.fit_map_from_states(src, tgt, layers=[(0, 0)], ridge="auto")
    assert plain.provenance["n_train_samples"] == 48
    r2_plain, r2_fixed, r2_auto = (float(m.r2_heldout[0]) for m in (plain, fixed, auto))
    assert r2_plain < -0.5 < 0.2 < r2_fixed
    assert float(auto.ridge[0]) > 0 and r2_auto > r2_plain + 1.0
    # the ridge shrinks: the weights' norm is below the least-squares one
    assert float(fixed.weight.norm()) < 0.5 * float(plain.weight.norm())


def test_empty_corpus_rejected(tiny_llama):
    with pytest.raises(ct.EmptyPromptsError, match="^texts: no corpus texts"):
        ct.fit_map(tiny_llama, tiny_llama, [])


def test_repeated_texts_are_used_once(tiny_llama, tiny_llama_b):
    """A text repeated in the corpus must not sit on both sides of the held-out split (R² would be a training score)."""
    texts = neutral_sentences()[:30]
    with pytest.warns(UserWarning, match="repeats 30 text"):
        doubled = ct.fit_map(tiny_llama, tiny_llama_b, texts + texts, ridge=0.0, holdout=0.2)
    once = ct.fit_map(tiny_llama, tiny_llama_b, texts, ridge=0.0, holdout=0.2)
    assert doubled.provenance["n_texts"] == once.provenance["n_texts"] == 30
    assert torch.equal(doubled.r2_heldout, once.r2_heldout) and torch.equal(doubled.weight, once.weight)


@pytest.mark.parametrize("bias,n", [(True, 90), (False, 90), (True, 25)])
def test_validation_r2_path_equals_solving_each_ridge(bias, n):
    """The ridge search's R² from three products equals fitting and scoring each strength
    (n = 25 < d_src = 40: rank-deficient, so λ = 0 is the min-norm fit through the eigenvalue cutoff)."""
    from contrans_tl.reformulate import RIDGE_GRID, Moments, NormalEquations, r2_score

    g = torch.Generator().manual_seed(11)
    pairs, d_src, d_tgt = 3, 40, 12
    shared = torch.randn(pairs, n + 30, 6, generator=g)
    x = shared @ torch.randn(pairs, 6, d_src, generator=g) + 0.05 * torch.randn(pairs, n + 30, d_src, generator=g) + 3
    y = shared @ torch.randn(pairs, 6, d_tgt, generator=g) + torch.randn(pairs, n + 30, d_tgt, generator=g) - 1
    factors = NormalEquations(Moments.of(x[:, :n], y[:, :n]), bias=bias)
    path = factors.validation_r2(x[:, n:], y[:, n:], RIDGE_GRID)
    for i, ridge in enumerate(RIDGE_GRID):
        w, b = factors.solve(torch.full((pairs,), ridge, dtype=torch.float64))
        expected = r2_score(x[:, n:], y[:, n:], w, b, factors.y_mean)
        assert torch.allclose(path[i], expected, atol=1e-9, rtol=0), ridge
    assert bool((path.max(0).values > path[0] + 1e-3).all())  # some ridge beats plain least squares here
