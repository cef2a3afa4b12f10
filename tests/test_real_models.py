"""Real behaviour on the offline SmolLM2-135M-Instruct (and Gemma-3-270m in the slow set)."""

from __future__ import annotations

import pytest
import torch

import contrans_tl as ct
from contrans_tl.capture import capture, next_token_logits
from contrans_tl.tasks.emotion import emotion_scenarios
from tests.conftest import rel_diff

CHAT = "<|im_start|>user\nHow are you?<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = ["The weather today is", CHAT, "Once upon a time, in a small village by the sea, there lived"]
QUERY = "Scenario: {}\nThe emotion of the above scenario is"


def _greedy_cached_equals_uncached(model) -> None:
    cached = ct.generate(model, PROMPTS, max_new_tokens=12, use_kv_cache=True)
    uncached = ct.generate(model, PROMPTS, max_new_tokens=12, use_kv_cache=False)
    one_by_one = [ct.generate(model, p, max_new_tokens=12)[0] for p in PROMPTS]
    assert cached == uncached == one_by_one
    assert all(len(text.strip()) > 0 for text in cached)


def test_kv_cache_generation_matches_uncached_smollm(smollm):
    _greedy_cached_equals_uncached(smollm)


@pytest.mark.slow
def test_kv_cache_generation_matches_uncached_gemma(gemma):
    _greedy_cached_equals_uncached(gemma)


def test_batched_capture_on_chat_text(smollm):
    """pad = eos = <|im_end|> also occurs inside the chat prompt: masks, not pad ids, decide."""
    for side in ("left", "right"):
        batched = capture(smollm, PROMPTS, batch_size=3, padding_side=side)
        single = torch.cat([capture(smollm, [p]) for p in PROMPTS])
        assert rel_diff(batched, single) <= 1e-4


FEW_SHOT = (
    "Scenario: I won the lottery.\nThe emotion of the above scenario is happy.\n\n"
    "Scenario: My dog died yesterday.\nThe emotion of the above scenario is sad.\n\n"
    "Scenario: Someone keyed my car on purpose.\nThe emotion of the above scenario is angry.\n\n"
)
WORDS = {"happiness": " happy", "sadness": " sad", "anger": " angry", "fear": " fear", "disgust": " disgust", "surprise": " surprise"}


def test_refined_concept_moves_the_model(smollm):
    """Transplanting fear makes ' fear' win among the emotion words on other emotions' scenarios."""
    data = emotion_scenarios()
    others = [e for e in data if e != "fear"]
    vector = ct.refine(
        smollm,
        [QUERY.format(s) for s in data["fear"][:30]],
        [QUERY.format(s) for e in others for s in data[e][:6]],
    )
    prompts = [FEW_SHOT + QUERY.format(s) for e in others for s in data[e][60:64]]
    ids = torch.tensor([smollm.tokenizer.encode(WORDS[e], add_special_tokens=False)[0] for e in data])
    fear = list(data).index("fear")
    base = next_token_logits(smollm, prompts)[:, ids].argmax(-1).eq(fear).float().mean()
    with ct.transplant(smollm, vector, alpha=0.5, layers=[24], unit="norm"):
        steered = next_token_logits(smollm, prompts)[:, ids].argmax(-1).eq(fear).float().mean()
        steered_text = ct.generate(smollm, prompts[0], max_new_tokens=6)
    assert steered >= base + 0.5
    assert steered_text != ct.generate(smollm, prompts[0], max_new_tokens=6)
