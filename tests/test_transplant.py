from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture, next_token_logits
from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError
from contrans_tl.reports.layer_search import auto_layers
from tests.conftest import hooks_attached

POS = ["I love this sunny day", "What a wonderful gift"]
NEG = ["The rain ruined everything", "I lost my keys again"]


@pytest.fixture
def vector(tiny_model):
    return ct.refine(tiny_model, POS, NEG)


def test_hooked_layer_gets_exactly_alpha_v(tiny_model, vector, prompts):
    base = capture(tiny_model, prompts)
    with ct.transplant(tiny_model, vector, alpha=3.0, layers=[1]):
        steered = capture(tiny_model, prompts)
    # layers before the hooked one are bit-identical; the hooked one is original + alpha * v
    assert torch.equal(steered[:, 0], base[:, 0])
    assert torch.allclose(steered[:, 1] - base[:, 1], 3.0 * vector.vectors[1].expand(len(prompts), -1), atol=1e-4)
    assert hooks_attached(tiny_model) == 0
    assert torch.equal(capture(tiny_model, prompts), base)


def test_invariants(tiny_model, vector, prompts):
    base = next_token_logits(tiny_model, prompts)
    with ct.transplant(tiny_model, vector, alpha=0.0):
        assert torch.equal(next_token_logits(tiny_model, prompts), base)
    with ct.transplant(tiny_model, vector - vector, alpha=5.0):
        assert torch.equal(next_token_logits(tiny_model, prompts), base)
    with ct.transplant(tiny_model, 2 * vector, alpha=1.5):
        a = next_token_logits(tiny_model, prompts)
    with ct.transplant(tiny_model, vector, alpha=3.0):
        b = next_token_logits(tiny_model, prompts)
    assert torch.allclose(a, b, atol=1e-4) and not torch.allclose(a, base, atol=1e-3)


def test_several_vectors_add_up(tiny_model, vector, prompts):
    other = ct.refine(tiny_model, NEG, POS[::-1] + ["more text here"])
    with ct.transplant(tiny_model, [vector, other], alpha=[1.0, 2.0]):
        both = capture(tiny_model, prompts)
    with ct.transplant(tiny_model, vector, alpha=1.0), ct.transplant(tiny_model, other, alpha=2.0):
        nested = capture(tiny_model, prompts)
    with ct.transplant(tiny_model, vector + 2 * other, alpha=1.0):
        summed = capture(tiny_model, prompts)
    assert torch.allclose(both, nested, atol=1e-4) and torch.allclose(both, summed, atol=1e-4)


def test_hooks_removed_on_exception(tiny_model, vector):
    with pytest.raises(RuntimeError, match="boom"):
        with ct.transplant(tiny_model, vector, alpha=1.0):
            # one offset hook per steered layer, plus the read-only NaN/inf check on the logits
            assert hooks_attached(tiny_model) == tiny_model.cfg.n_layers + 1
            raise RuntimeError("boom")
    assert hooks_attached(tiny_model) == 0


def test_bad_layer_leaves_no_hooks(tiny_model, vector):
    with pytest.raises(ct.LayerIndexError):
        with ct.transplant(tiny_model, vector, alpha=1.0, layers=[0, 9]):
            pass
    assert hooks_attached(tiny_model) == 0


def test_norm_units(tiny_model, vector, prompts):
    base = capture(tiny_model, prompts)
    with ct.transplant(tiny_model, vector, alpha=0.5, layers=[0], unit="norm"):
        steered = capture(tiny_model, prompts)
    added = (steered[:, 0] - base[:, 0])[0]
    assert torch.allclose(added.norm(), 0.5 * vector.layer_norms[0], rtol=1e-4)


def test_vector_of_other_model_rejected(tiny_llama, tiny_llama_b):
    v = ct.refine(tiny_llama, POS, NEG)
    with pytest.raises(ct.WidthMismatchError, match="width 64"):
        with ct.transplant(tiny_llama_b, v, alpha=1.0):
            pass
    same_width_other = ct.ConceptVector(
        v.vectors, ct.ModelIdentity("someone-else", None, 2, 64), (0, 1), "mean_diff"
    )
    with pytest.raises(ct.ModelMismatchError, match="someone-else"):
        with ct.transplant(tiny_llama, same_width_other, alpha=1.0):
            pass
    assert hooks_attached(tiny_llama) == 0


def test_loaded_vector_checked_against_model(tiny_llama, tiny_neox, tmp_path):
    path = ct.refine(tiny_llama, POS, NEG).save(tmp_path / "v.safetensors")
    with pytest.raises(ct.ModelMismatchError, match="made for"):
        with ct.transplant(tiny_neox, ct.ConceptVector.load(path), alpha=1.0):
            pass


def test_steering_acts_during_generation(tiny_model, vector):
    plain = ct.generate(tiny_model, ["The river runs"], max_new_tokens=6)
    with ct.transplant(tiny_model, vector, alpha=50.0):
        steered = ct.generate(tiny_model, ["The river runs"], max_new_tokens=6)
        steered_nocache = ct.generate(tiny_model, ["The river runs"], max_new_tokens=6, use_kv_cache=False)
    assert steered != plain
    assert steered == steered_nocache


def test_auto_layers_follow_the_map_fit(tiny_llama):
    from contrans_tl.datasets import neutral_sentences

    amap = ct.fit_map(tiny_llama, tiny_llama, neutral_sentences()[:60], ridge=0.0)
    v_hat = amap.apply(ct.refine(tiny_llama, POS, NEG))
    with ct.transplant(tiny_llama, v_hat, alpha=1.0, layers=auto_layers(v_hat)) as offsets:
        assert sorted(offsets) == [0, 1]  # a self-map fits every pair (R² ≈ 1)
    for text in ("auto", "all"):  # strings are refused: the message points at auto_layers
        with pytest.raises(InvalidArgumentError, match="auto_layers") as err:
            with ct.transplant(tiny_llama, v_hat, alpha=1.0, layers=text):
                pass
        assert err.value.argument == "layers"
    assert hooks_attached(tiny_llama) == 0


def _transplant_error(model, vector, error, argument, **kwargs):
    """transplant(**kwargs) raises ``error`` whose message names ``argument``, before any hook is added."""
    kwargs.setdefault("alpha", 1.0)
    with pytest.raises(error) as err:
        with ct.transplant(model, vector, **kwargs):
            pass
    assert argument in str(err.value)
    assert hooks_attached(model) == 0


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"unit": "fraction"}, "unit"),
        ({"unit": None}, "unit"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "1.0"}, "alpha"),
        ({"alpha": None}, "alpha"),
        ({"alpha": True}, "alpha"),
        ({"alpha": [1.0, float("nan")]}, "alpha"),
        ({"alpha": [1.0, 2.0]}, "alpha"),  # two strengths for one vector
        ({"layers": [0, 0]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layers": "0,1"}, "layers"),
        ({"layers": [0.5]}, "layers"),
    ],
)
def test_transplant_rejects_bad_arguments(tiny_llama, kwargs, argument):
    vector = ct.refine(tiny_llama, POS, NEG)
    _transplant_error(tiny_llama, vector, InvalidArgumentError, argument, **kwargs)


@pytest.mark.parametrize("bad", [[], (), "joy", None, ["not a vector"], torch.zeros(2, 64)])
def test_transplant_rejects_a_bad_vector(tiny_llama, bad):
    _transplant_error(tiny_llama, bad, InvalidArgumentError, "vector")


@pytest.mark.parametrize(
    "prompts, error",
    [
        ([], EmptyPromptsError),
        ("", EmptyPromptsError),
        (["fine", ""], EmptyPromptsError),
        (None, InvalidArgumentError),
        (42, InvalidArgumentError),
        ([1, 2], InvalidArgumentError),
        (b"bytes", InvalidArgumentError),
    ],
)
def test_generate_rejects_bad_prompts(tiny_llama, prompts, error):
    with pytest.raises(error) as err:
        ct.generate(tiny_llama, prompts, max_new_tokens=2)
    assert "prompts" in str(err.value)


@pytest.mark.parametrize("max_new_tokens", [0, -3, 2.5, "4", None, True])
def test_generate_rejects_bad_max_new_tokens(tiny_llama, max_new_tokens):
    with pytest.raises(InvalidArgumentError) as err:
        ct.generate(tiny_llama, ["The river runs"], max_new_tokens=max_new_tokens)
    assert "max_new_tokens" in str(err.value)


@pytest.mark.parametrize("alpha", [1e30, 1e38])
def test_overflowing_steering_raises_naming_layer_and_alpha(tiny_llama, alpha):
    """Generation and scoring under a steering that overflows the activations raise, never return ''."""
    n_layers, d_model = tiny_llama.cfg.n_layers, tiny_llama.cfg.d_model
    vector = ct.ConceptVector(torch.ones(n_layers, d_model), ct.identity(tiny_llama), tuple(range(n_layers)), "mean_diff")
    with ct.transplant(tiny_llama, vector, alpha=alpha, layers=[1]):
        with pytest.raises(ct.NonFiniteError, match=r"layer.* 1.*alpha|alpha.*layer"):
            ct.generate(tiny_llama, "a short prompt", max_new_tokens=2)
        with pytest.raises(ct.NonFiniteError, match="alpha"):
            ct.next_token_logits(tiny_llama, ["a short prompt"])
    assert ct.generate(tiny_llama, "a short prompt", max_new_tokens=2)  # hooks gone: the model is clean
