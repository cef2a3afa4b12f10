from __future__ import annotations

import torch

from contrans_tl.pairing import capture_paired, positions_at_boundaries, word_boundaries


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
