from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture, encode, next_token_logits, pad_batch
from tests.conftest import hooks_attached, rel_diff


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_at_a_time(tiny_model, prompts, padding_side):
    batched = capture(tiny_model, prompts, batch_size=4, padding_side=padding_side)
    single = torch.cat([capture(tiny_model, [p], batch_size=1) for p in prompts])
    assert batched.shape == (len(prompts), tiny_model.cfg.n_layers, tiny_model.cfg.d_model)
    assert rel_diff(batched, single) <= 1e-4


def test_capture_matches_hf_hidden_states(tiny_model, prompts):
    """resid_post of block l is the HF decoder layer's output: hidden_states[l + 1]."""
    got = capture(tiny_model, prompts, batch_size=3)
    hf = tiny_model.original_model
    for i, prompt in enumerate(prompts):
        ids, _ = encode(tiny_model, [prompt])
        with torch.no_grad():
            out = hf(torch.tensor(ids), output_hidden_states=True)
        # the last entry of hidden_states has the final norm applied; compare the blocks before it
        for layer in range(tiny_model.cfg.n_layers - 1):
            ref = out.hidden_states[layer + 1][0, -1]
            assert torch.allclose(got[i, layer], ref, rtol=1e-4, atol=1e-5)


def test_left_padding_puts_last_token_at_end():
    batch = pad_batch([[1, 2, 3], [4]], pad_id=0, padding_side="left")
    assert batch.input_ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    right = pad_batch([[1, 2, 3], [4]], pad_id=9, padding_side="right")
    assert right.input_ids.tolist() == [[1, 2, 3], [4, 9, 9]]


def test_bos_prepended_once(tiny_llama):
    bos = tiny_llama.tokenizer.bos_token_id
    (plain,), _ = encode(tiny_llama, ["hello there"])
    (already,), _ = encode(tiny_llama, ["<bos>hello there"])
    assert plain[0] == bos and plain[1] != bos
    assert already == plain


def test_logits_batched_equal_single(tiny_model, prompts):
    batched = next_token_logits(tiny_model, prompts, batch_size=4)
    single = torch.cat([next_token_logits(tiny_model, [p]) for p in prompts])
    assert rel_diff(batched, single) <= 1e-4


def test_empty_prompts_rejected(tiny_llama):
    with pytest.raises(ct.EmptyPromptsError, match="no prompts"):
        capture(tiny_llama, [])


def test_prompt_longer_than_context_rejected(tiny_llama):
    long = " ".join(["word"] * 400)
    with pytest.raises(ct.PromptTooLongError, match="context of 128"):
        capture(tiny_llama, ["short", long])


def test_layer_out_of_range_rejected(tiny_llama):
    with pytest.raises(ct.LayerIndexError, match="out of range"):
        capture(tiny_llama, ["a b c"], layers=[0, 7])


def test_nan_activations_named(tiny_llama):
    def poison(resid, *, hook):
        return resid * float("nan")

    with tiny_llama.hooks(fwd_hooks=[("blocks.1.hook_resid_post", poison)]):
        with pytest.raises(ct.NonFiniteError, match="layer 1"):
            capture(tiny_llama, ["a b c", "d e"])
    assert hooks_attached(tiny_llama) == 0


def test_shared_prefix_equals_full_prompt(tiny_model, prompts):
    """The cached few-shot prefix gives the logits of running prefix + prompt in full."""
    import contrans_tl as ct

    prefix = "Some shared context for every prompt.\n"
    (prefix_ids,), _ = encode(tiny_model, [prefix])
    full_ids = [prefix_ids + tiny_model.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    batch = pad_batch(full_ids, pad_id=0, padding_side="left")
    with torch.no_grad():
        ref = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    got = next_token_logits(tiny_model, prompts, prefix=prefix, batch_size=2)
    assert rel_diff(got, ref) <= 1e-4
    v = ct.refine(tiny_model, ["good day"], ["bad day"])
    with ct.transplant(tiny_model, v, alpha=20.0):
        steered = next_token_logits(tiny_model, prompts, prefix=prefix, batch_size=2)
        with torch.no_grad():
            steered_ref = tiny_model(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
    assert rel_diff(steered, steered_ref) <= 1e-4 and not torch.allclose(steered, got)
