"""contrans_tl.lens: the logit-lens read-out and the token-shift tables."""

from __future__ import annotations

import csv
import io

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture, next_token_logits
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.lens import (
    concept_readout,
    count_tokens,
    final_norm_gain,
    final_softcap,
    lens_resid,
    logit_lens,
    logits_from_resid,
    shift_csv,
    shift_markdown,
    token_label,
    token_shift,
    topk_overlap,
)
from contrans_tl.transplant import steering_offsets


def _assert_reproduces(model, prompts) -> None:
    last = int(model.cfg.n_layers) - 1
    lens = logit_lens(model, prompts, last, logits=True)
    direct = next_token_logits(model, prompts)
    assert lens.shape == direct.shape
    assert float((lens - direct).abs().max()) <= 1e-4 * max(1.0, float(direct.abs().max()))
    probs = logit_lens(model, prompts, last)
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(prompts)), atol=1e-4, rtol=0)  # float32 sum over the vocabulary


def test_final_block_reproduces_next_token_logits(tiny_model, prompts):
    assert final_softcap(tiny_model) is None
    _assert_reproduces(tiny_model, prompts)


@pytest.fixture(scope="module")
def tiny_gemma3_softcap(tmp_path_factory):
    """A tiny Gemma 3 with final logit soft-capping (the offline gemma-3-270m has none)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from contrans_tl.testing import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=128, max_position_embeddings=128, final_logit_softcapping=1.0,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    with torch.no_grad():  # logits of several units, so the cap bends them visibly
        model.model.norm.weight.fill_(4.0)
    path = tmp_path_factory.mktemp("gemma3") / "tiny"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return ct.load_model(path, device="cpu")


def test_gemma3_final_softcap_is_applied(tiny_gemma3_softcap, prompts):
    model = tiny_gemma3_softcap
    assert final_softcap(model) == 1.0
    _assert_reproduces(model, prompts)
    # without the cap the read-out would differ: the test is not vacuous
    resid = capture(model, prompts, layers=[1])[:, 0]
    raw = model.unembed(model.ln_final(resid[:, None])).detach()[:, 0]
    assert float(raw.abs().max()) > 1.5
    assert float(logits_from_resid(model, resid).abs().max()) <= 1.0


def test_lens_sees_the_transplanted_offset(tiny_llama, prompts):
    """Read at the steering block, the lens equals the unsteered residual plus the offset."""
    vector = ct.refine(tiny_llama, prompts[:3], prompts[2:])
    layer = 0
    (offset,) = steering_offsets([vector], [0.5], layers=[layer], unit="norm").values()
    steered = logit_lens(tiny_llama, prompts, layer, vector=vector, alpha=0.5, unit="norm", logits=True)
    resid = capture(tiny_llama, prompts, layers=[layer])[:, 0]
    expected = logits_from_resid(tiny_llama, resid + offset)
    torch.testing.assert_close(steered, expected, atol=1e-4, rtol=1e-4)
    # alpha 0 or no vector: the plain read-out; and the context leaves no hook behind
    plain = logit_lens(tiny_llama, prompts, layer, logits=True)
    torch.testing.assert_close(logit_lens(tiny_llama, prompts, layer, vector=vector, alpha=0.0, logits=True), plain)
    assert not torch.allclose(steered, plain)
    from tests.conftest import hooks_attached

    assert hooks_attached(tiny_llama) == 0


def test_readout_and_norm_gain(tiny_neox):
    ln = tiny_neox.ln_final.original_component
    saved = ln.weight.detach().clone(), ln.bias.detach().clone()
    try:
        with torch.no_grad():
            ln.weight.copy_(torch.rand(64) + 0.5)
            ln.bias.copy_(torch.randn(64))
        gain = final_norm_gain(tiny_neox)
        assert torch.allclose(gain, ln.weight.detach(), atol=1e-3)
        w_u = tiny_neox.W_U.detach()
        r = concept_readout(tiny_neox, [5], [7, 9], fold_norm=False)
        assert torch.allclose(r, w_u[:, 5] - w_u[:, [7, 9]].mean(1), atol=1e-6)
        assert torch.allclose(concept_readout(tiny_neox, [5], [7, 9]), r * gain, atol=1e-5)
    finally:
        with torch.no_grad():
            ln.weight.copy_(saved[0])
            ln.bias.copy_(saved[1])


def test_readout_and_lens_argument_checks(tiny_llama, prompts):
    with pytest.raises(InvalidArgumentError, match="concept_tokens"):
        concept_readout(tiny_llama, [])
    vector = ct.refine(tiny_llama, prompts[:3], prompts[2:])
    with pytest.raises(InvalidArgumentError, match="steer_layers"):
        lens_resid(tiny_llama, prompts, [0, 1], vector=vector, alpha=0.5)


def test_token_shift_picks_largest_changes():
    before = torch.tensor([[0.5, 0.2, 0.2, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25, 0.0]])
    after = torch.tensor([[0.1, 0.17, 0.3, 0.03, 0.4], [0.0, 0.5, 0.25, 0.05, 0.2]])
    sh = token_shift(before, after, k=2)
    assert sh.k == 2
    assert sh.rising.tolist() == [[4, 2], [1, 4]]
    assert sh.falling.tolist() == [[0, 3], [0, 3]]
    torch.testing.assert_close(sh.rising_delta[0], torch.tensor([0.4, 0.1]))
    torch.testing.assert_close(sh.falling_delta[1], torch.tensor([-0.25, -0.2]))
    with pytest.raises(ValueError):
        token_shift(before, after[:1])


class _Tok:
    """A stand-in tokenizer: id → text."""

    table = {0: " happy", 1: "happy", 2: " joy", 3: " ", 4: "\ufffd", 5: " sad|ness"}

    def decode(self, ids):
        return "".join(self.table[i] for i in ids)

    def convert_ids_to_tokens(self, i):
        return f"<raw{i}>"


def test_count_tokens_merges_labels_and_counts_prompts():
    ids = torch.tensor([[0, 1, 2], [2, 3, 4], [0, 5, 2]])
    counts = count_tokens(ids, _Tok())
    # "happy" and " happy" count together, once per prompt; ties keep first-appearance order
    assert counts == [("joy", 3), ("happy", 2), ("'<raw3>'", 1), ("'<raw4>'", 1), ("sad|ness", 1)]
    assert token_label(_Tok(), 3) == "'<raw3>'"  # blank → raw token, never an empty cell


def test_topk_overlap():
    a = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    b = torch.tensor([[4, 3, 9, 10], [5, 6, 7, 8]])
    ov = topk_overlap(a, b)
    assert ov["k"] == 4
    assert ov["per_prompt_shared"] == [0.5, 1.0]
    assert ov["mean_shared_fraction"] == pytest.approx(0.75)
    assert ov["mean_jaccard"] == pytest.approx((2 / 6 + 1.0) / 2)
    with pytest.raises(ValueError):
        topk_overlap(a, b[:, :2])


def test_tables_markdown_and_csv():
    table = {"happiness": {"rising": [("happy", 9), ("a|b", 3)], "falling": [("sad", 7)]}}
    md = shift_markdown(table, top=1, title="T")
    assert md.startswith("### T")
    assert "| happiness | happy (9) | sad (7) |" in md
    assert "a\\|b" in shift_markdown(table, top=5)  # pipes escaped inside cells
    rows = list(csv.reader(io.StringIO(shift_csv(table))))
    assert rows[0] == ["concept", "direction", "rank", "token", "count"]
    assert ["happiness", "rising", "2", "a|b", "3"] in rows
    assert len(rows) == 4


def test_smollm_final_block_reproduces_logits(smollm):
    _assert_reproduces(smollm, ["The weather today is", "Scenario: I lost my keys.\nThe emotion of the above scenario is"])


@pytest.mark.slow
def test_gemma_final_block_reproduces_logits(gemma):
    assert final_softcap(gemma) is None  # gemma-3-270m's config: final_logit_softcapping null
    _assert_reproduces(gemma, ["The weather today is", "Scenario: I lost my keys.\nThe emotion of the above scenario is"])
