from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import resid_hook_name
from contrans_tl.pairing import capture_paired, positions_at_boundaries, word_boundaries
from contrans_tl.testing import make_tiny_model_dir, make_tiny_tokenizer

# double spaces, a tab, punctuation, a non-ASCII word and a one-word text: boundaries the two
# tokenizers split differently
CROSS_TEXTS = [
    "The river  runs past\tthe old mill, slowly.",
    "Bread rises overnight",
    "Cooking rice takes about twenty minutes when the water boils steadily",
    "A café; open-air!",
    "x",
]


def test_word_boundaries():
    assert word_boundaries("The cat  sat.") == [3, 7, 13]
    assert word_boundaries("") == []


def test_positions_pick_last_token_ending_before_boundary():
    # "The cat sat" split as [BOS] "The" " c" "at" " sat"
    offsets = [(0, 0), (0, 3), (3, 5), (5, 7), (7, 11)]
    assert positions_at_boundaries(offsets, [3, 7, 11]) == [1, 3, 4]
    # a token crossing a boundary is not used for it
    assert positions_at_boundaries([(0, 0), (0, 5), (5, 9)], [3, 9]) == [1, 2]


def test_one_sample_per_word_for_any_tokenizer(tiny_llama, tiny_neox):
    # these two share one tokenizer (only the BOS policy differs); other tokenizers: below
    texts = ["The river runs past the mill", "Bread rises slowly overnight"]
    a = capture_paired(tiny_llama, texts)
    b = capture_paired(tiny_neox, texts)
    assert a.states.shape[0] == b.states.shape[0] == 10
    assert torch.equal(a.text_index, b.text_index)
    assert a.corpus == b.corpus


def test_aligned_states_round_trip(tiny_llama, tmp_path):
    states = capture_paired(tiny_llama, ["one two three"], layers=[1])
    loaded = type(states).load(states.save(tmp_path / "s.safetensors"))
    assert torch.equal(loaded.states, states.states) and loaded.layers == (1,)
    assert loaded.model == states.model


# ---- two models whose tokenizers differ -------------------------------------------------------------
@pytest.fixture(scope="module")
def small_vocab_neox(tmp_path_factory):
    """A tiny GPT-NeoX whose tokenizer has a 300-token vocabulary (the other tiny models share one
    of 512 tokens, so only this pairing exercises word-boundary alignment across tokenizers)."""
    path = make_tiny_model_dir(tmp_path_factory.mktemp("small_vocab") / "neox", "gpt_neox", seed=5)
    make_tiny_tokenizer(vocab_size=300).save_pretrained(path)  # ids stay inside the 512-row embedding
    return ct.load_model(path, device="cpu")


def _expected_positions(model, text: str) -> list[int]:
    """Straight from the tokenizer's offsets: per word, the last token ending at or before the
    word's end (shifted by one when the model prepends BOS)."""
    enc = model.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    shift = 1 if model.cfg.default_prepend_bos else 0
    token_ends = [end for _, end in enc["offset_mapping"]]
    word_ends, start = [], 0
    for word in text.split():
        start = text.index(word, start) + len(word)
        word_ends.append(start)
    return [shift + max(i for i, end in enumerate(token_ends) if end <= w) for w in word_ends]


def _resid_post_at(model, text: str, positions: list[int], layers: list[int]) -> torch.Tensor:
    """resid_post of one unbatched, unpadded forward pass at ``positions``: [position, layer, d_model]."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if model.cfg.default_prepend_bos:
        ids = [model.tokenizer.bos_token_id] + ids
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=[resid_hook_name(l) for l in layers])
    return torch.stack([cache[resid_hook_name(l)][0, positions] for l in layers], dim=1)


def test_cross_tokenizer_pairing_follows_word_boundaries(tiny_llama, small_vocab_neox):
    a_model, b_model = tiny_llama, small_vocab_neox
    assert a_model.tokenizer.get_vocab() != b_model.tokenizer.get_vocab()
    a = capture_paired(a_model, CROSS_TEXTS, scheme="words", batch_size=3)
    b = capture_paired(b_model, CROSS_TEXTS, scheme="words", batch_size=3)
    n_words = torch.tensor([len(t.split()) for t in CROSS_TEXTS])
    for states in (a, b):
        assert torch.equal(torch.bincount(states.text_index, minlength=len(CROSS_TEXTS)), n_words)
    assert torch.equal(a.text_index, b.text_index) and a.corpus == b.corpus and a.scheme == b.scheme == "words"

    differ = 0
    for i, text in enumerate(CROSS_TEXTS):
        pos_a, pos_b = _expected_positions(a_model, text), _expected_positions(b_model, text)
        differ += pos_a != pos_b
        for model, states, pos in ((a_model, a, pos_a), (b_model, b, pos_b)):
            want = _resid_post_at(model, text, pos, list(states.layers))
            assert torch.allclose(states.states[states.text_index == i], want, rtol=1e-4, atol=1e-5), (text, pos)
    assert differ >= 3  # the two tokenizers really place the words at different token positions


def test_cross_tokenizer_pairing_is_stable_across_batch_sizes(tiny_llama, small_vocab_neox):
    for model in (tiny_llama, small_vocab_neox):
        one = capture_paired(model, CROSS_TEXTS, batch_size=1)
        for batch_size in (2, 5):
            many = capture_paired(model, CROSS_TEXTS, batch_size=batch_size)
            assert torch.equal(many.text_index, one.text_index)
            assert torch.allclose(many.states, one.states, rtol=1e-4, atol=1e-5)


def test_fit_map_across_tokenizers_aligns_words(tiny_llama, small_vocab_neox):
    from contrans_tl.datasets import neutral_sentences

    texts = neutral_sentences()[:30]
    amap = ct.fit_map(tiny_llama, small_vocab_neox, texts, layers=[(1, 1)], ridge=0.1)
    assert amap.provenance["alignment"] == "words"
    assert amap.provenance["n_train_samples"] + amap.provenance["n_heldout_samples"] == sum(
        len(t.split()) for t in texts)
