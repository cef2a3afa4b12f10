"""The emotion task of the paper (§4): prompts, splits, label tokens and its evaluation.

A concept vector for emotion e is refined from scenarios of e (positives) against as many
scenarios of the other five (negatives, seeded), all in the refinement prompt. Evaluation
puts a few-shot block (one solved example per emotion, from the refinement half) before
the same query and reads the next token: Token Acc is the argmax over the vocabulary being
e's label token, Logit Acc the argmax among the six label tokens being e's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from contrans_tl.capture import next_token_logits
from contrans_tl.datasets import EMOTIONS
from contrans_tl.errors import EmptyPromptsError
from contrans_tl.metrics import logit_accuracy, token_accuracy

__all__ = [
    "QUERY",
    "LABELS",
    "EmotionSplit",
    "split_scenarios",
    "contrast_prompts",
    "few_shot_prefix",
    "label_tokens",
    "evaluate_emotion",
]

QUERY = "Scenario: {}\nThe emotion of the above scenario is"
"""The paper's refinement prompt; evaluation prompts are a few-shot block plus this query."""

LABELS: dict[str, str] = {
    "happiness": "happy",
    "sadness": "sad",
    "anger": "angry",
    "fear": "afraid",
    "disgust": "disgusted",
    "surprise": "surprised",
}
"""The word a model should answer for each emotion (its first token, after a space, is scored)."""


@dataclass(frozen=True)
class EmotionSplit:
    """Scenarios per emotion, split into a refinement half and an evaluation half."""

    refine: dict[str, list[str]]
    evaluate: dict[str, list[str]]


def split_scenarios(data: Mapping[str, Sequence[str]], *, seed: int = 0) -> EmotionSplit:
    """Shuffle each emotion's scenarios (seeded) and cut them in half."""
    rng = random.Random(seed)
    refine, evaluate = {}, {}
    for emotion, items in data.items():
        items = list(items)
        if len(items) < 4:
            raise EmptyPromptsError(f"{emotion}: need at least 4 scenarios, got {len(items)}")
        rng.shuffle(items)
        half = len(items) // 2
        refine[emotion], evaluate[emotion] = items[:half], items[half:]
    return EmotionSplit(refine, evaluate)


def contrast_prompts(
    scenarios: Mapping[str, Sequence[str]], emotion: str, *, n: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Positives: ``n`` scenarios of ``emotion``; negatives: as many drawn from the others."""
    if emotion not in scenarios:
        raise EmptyPromptsError(f"no scenarios for {emotion!r}")
    rng = random.Random(f"{seed}-{emotion}")
    own = list(scenarios[emotion])[: n if n is not None else None]
    others = [s for e, items in scenarios.items() if e != emotion for s in items]
    if not own or len(others) < len(own):
        raise EmptyPromptsError(f"{emotion}: {len(own)} positives but {len(others)} other scenarios")
    return [QUERY.format(s) for s in own], [QUERY.format(s) for s in rng.sample(others, len(own))]


def few_shot_prefix(scenarios: Mapping[str, Sequence[str]], *, seed: int = 0) -> str:
    """One solved example per emotion (taken from the refinement half), in a seeded order."""
    rng = random.Random(f"shots-{seed}")
    shots = [(e, rng.choice(list(items))) for e, items in scenarios.items()]
    rng.shuffle(shots)
    return "".join(QUERY.format(s) + f" {LABELS[e]}.\n\n" for e, s in shots)


def label_tokens(tokenizer: object, emotions: Sequence[str] = EMOTIONS) -> Int[Tensor, "n_labels"]:
    """First token of " <label>" for each emotion; raises if two labels share it."""
    ids = [tokenizer.encode(" " + LABELS[e], add_special_tokens=False)[0] for e in emotions]  # type: ignore[attr-defined]
    if len(set(ids)) != len(ids):
        raise EmptyPromptsError(f"label words share first tokens under this tokenizer: {ids}")
    return torch.tensor(ids)


def evaluate_emotion(
    model: torch.nn.Module,
    scenarios: Sequence[str],
    emotion: str,
    *,
    prefix: str,
    emotions: Sequence[str] = EMOTIONS,
    batch_size: int = 16,
) -> dict[str, float]:
    """Token Acc and Logit Acc for answering ``emotion`` on ``scenarios`` (under active hooks)."""
    labels = label_tokens(model.tokenizer, emotions)  # type: ignore[attr-defined]
    target = list(emotions).index(emotion)
    logits = next_token_logits(model, [QUERY.format(s) for s in scenarios], prefix=prefix, batch_size=batch_size)
    return {
        "token_acc": token_accuracy(logits, int(labels[target])),
        "logit_acc": logit_accuracy(logits, labels, target),
        "n": len(scenarios),
    }
