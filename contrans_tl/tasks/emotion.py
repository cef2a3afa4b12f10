"""The emotion task of the paper (§4): prompts, splits, label tokens and its evaluation.

A concept vector for emotion e is refined from scenarios of e (positives) against as many
scenarios of the other five (negatives, seeded), all in the refinement prompt. Evaluation
puts a few-shot block (one solved example per emotion, from the refinement half) before
the same query and reads the next token: Token Acc is the argmax over the vocabulary being
e's label token, Logit Acc the argmax among the six label tokens being e's.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import next_token_logits
from contrans_tl.datasets import data_dir
from contrans_tl.errors import DataFormatError, EmptyPromptsError, InvalidArgumentError, LabelTokenError
from contrans_tl.handle import ModelHandle
from contrans_tl.metrics import logit_accuracy
from contrans_tl.refine import refine
from contrans_tl.transplant import Unit, transplant

__all__ = [
    "EMOTIONS",
    "QUERY",
    "LABELS",
    "emotion_scenarios",
    "EmotionSplit",
    "split_scenarios",
    "contrast_prompts",
    "few_shot_prefix",
    "label_tokens",
    "Answers",
    "answers",
    "evaluate_emotion",
    "EmotionTask",
    "emotion_task",
]

EMOTIONS: tuple[str, ...] = ("happiness", "sadness", "anger", "fear", "disgust", "surprise")
"""The six emotions of the paper's emotion experiment, in plotting order."""

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


def emotion_scenarios(
    directory: str | Path | None = None, emotions: Sequence[str] = EMOTIONS
) -> dict[str, list[str]]:
    """Scenarios per emotion from ``directory`` of ``{emotion}.json`` lists (default: the built-in set).

    The built-in set has 70 short scenarios per emotion that describe a situation without naming
    the emotion; any folder in the same format (the public RepE set, say) can replace it.
    """
    root = Path(directory) if directory is not None else data_dir() / "emotions"
    if directory is not None and not root.is_dir():
        raise InvalidArgumentError("data_dir", str(directory), "a folder of <emotion>.json scenario lists")
    out: dict[str, list[str]] = {}
    for emotion in emotions:
        path = root / f"{emotion}.json"
        if not path.is_file():
            raise DataFormatError(f"no scenario file for {emotion!r}: expected {path}")
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataFormatError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise DataFormatError(f"{path} must be a JSON list of strings")
        if not items:
            raise EmptyPromptsError(f"{path} holds no scenarios")
        out[emotion] = items
    return out


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
            raise DataFormatError(f"{emotion}: need at least 4 scenarios, got {len(items)}")
        rng.shuffle(items)
        half = len(items) // 2
        refine[emotion], evaluate[emotion] = items[:half], items[half:]
    return EmotionSplit(refine, evaluate)


def contrast_prompts(
    scenarios: Mapping[str, Sequence[str]], emotion: str, *, n: int | None = None, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Positives: ``n`` scenarios of ``emotion``; negatives: as many drawn from the others."""
    if emotion not in scenarios:
        raise InvalidArgumentError("emotion", emotion, f"one of {sorted(scenarios)}")
    rng = random.Random(f"{seed}-{emotion}")
    own = list(scenarios[emotion])[: n if n is not None else None]
    others = [s for e, items in scenarios.items() if e != emotion for s in items]
    if not own:
        raise EmptyPromptsError(f"{emotion}: no positive scenarios (n={n!r})")
    if len(others) < len(own):
        raise InvalidArgumentError("n", n, f"at most {len(others)} for {emotion!r}: the other emotions' scenarios "
                                   "supply one negative per positive")
    return [QUERY.format(s) for s in own], [QUERY.format(s) for s in rng.sample(others, len(own))]


def few_shot_prefix(scenarios: Mapping[str, Sequence[str]], *, seed: int = 0) -> str:
    """One solved example per emotion (taken from the refinement half), in a seeded order."""
    rng = random.Random(f"shots-{seed}")
    shots = [(e, rng.choice(list(items))) for e, items in scenarios.items()]
    rng.shuffle(shots)
    return "".join(QUERY.format(s) + f" {LABELS[e]}.\n\n" for e, s in shots)


def label_tokens(tokenizer: Any, emotions: Sequence[str] = EMOTIONS) -> Int[Tensor, "n_labels"]:
    """First token of " <label>" for each emotion; raises if two labels share it."""
    ids = [tokenizer.encode(" " + LABELS[e], add_special_tokens=False)[0] for e in emotions]
    if len(set(ids)) != len(ids):
        raise LabelTokenError(f"label words share first tokens under this tokenizer: {ids}")
    return torch.tensor(ids)


def _label_logits(
    model: ModelHandle, scenarios: Sequence[str], prefix: str, emotions: Sequence[str], batch_size: int
) -> tuple[Float[Tensor, "batch d_vocab"], Int[Tensor, "n_labels"]]:
    """Next-token logits after the few-shot ``prefix`` + query of each scenario, and the label tokens."""
    labels = label_tokens(model.tokenizer, emotions)
    logits = next_token_logits(model, [QUERY.format(s) for s in scenarios], prefix=prefix, batch_size=batch_size)
    return logits, labels


@dataclass(frozen=True)
class Answers:
    """What the model answered after each scenario: its top token, and the six label tokens' logits.

    Compact (no vocabulary-wide rows), so answers can be kept and re-read: the demo scores each
    scenario once unsteered and reads every emotion's baseline from the same answers.
    """

    scenarios: tuple[str, ...]
    top: Int[Tensor, " n"]
    """Argmax over the whole vocabulary (Token Acc compares it with a label token)."""
    label_logits: Float[Tensor, "n n_labels"]
    labels: Int[Tensor, " n_labels"]
    emotions: tuple[str, ...]

    def subset(self, scenarios: Sequence[str]) -> "Answers":
        """The answers to ``scenarios`` (each must be among these)."""
        where = {s: i for i, s in enumerate(self.scenarios)}
        missing = [s for s in scenarios if s not in where]
        if missing:
            raise InvalidArgumentError("scenarios", missing[:3], "scenarios these answers were computed for")
        idx = torch.tensor([where[s] for s in scenarios], dtype=torch.long)
        return Answers(tuple(scenarios), self.top[idx], self.label_logits[idx], self.labels, self.emotions)

    def accuracy(self, emotion: str) -> dict[str, Any]:
        """Token Acc (top token is ``emotion``'s label) and Logit Acc (its label wins among the six)."""
        target = list(self.emotions).index(emotion)
        n = len(self.scenarios)
        if n == 0:
            return {"token_acc": float("nan"), "logit_acc": float("nan"), "n": 0,
                    "label_counts": {e: 0 for e in self.emotions}}
        winners = self.label_logits.argmax(-1)
        return {
            "token_acc": float((self.top == self.labels[target]).float().mean()),
            "logit_acc": logit_accuracy(self.label_logits, torch.arange(len(self.labels)), target),
            "n": n,
            # which label won among the six, per scenario: the row of a transplant confusion matrix
            "label_counts": {e: int((winners == i).sum()) for i, e in enumerate(self.emotions)},
        }


def answers(
    model: ModelHandle,
    scenarios: Sequence[str],
    *,
    prefix: str,
    emotions: Sequence[str] = EMOTIONS,
    batch_size: int = 16,
) -> Answers:
    """The model's answer to each scenario's query after the few-shot ``prefix`` (under active hooks)."""
    logits, labels = _label_logits(model, scenarios, prefix, emotions, batch_size)
    return Answers(tuple(scenarios), logits.argmax(-1), logits[:, labels], labels, tuple(emotions))


def evaluate_emotion(
    model: ModelHandle,
    scenarios: Sequence[str],
    emotion: str,
    *,
    prefix: str,
    emotions: Sequence[str] = EMOTIONS,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Token Acc and Logit Acc for answering ``emotion`` on ``scenarios`` (under active hooks)."""
    return answers(model, scenarios, prefix=prefix, emotions=emotions, batch_size=batch_size).accuracy(emotion)


def label_probability(
    model: ModelHandle,
    scenarios: Sequence[str],
    emotion: str,
    *,
    prefix: str,
    emotions: Sequence[str] = EMOTIONS,
    batch_size: int = 16,
) -> float:
    """Mean probability of ``emotion``'s label among the six label tokens (a smooth Logit Acc)."""
    logits, labels = _label_logits(model, scenarios, prefix, emotions, batch_size)
    return float(torch.softmax(logits[:, labels].double(), -1)[:, list(emotions).index(emotion)].mean())


@dataclass(frozen=True)
class EmotionTask:
    """The emotion task of one run: which emotions are steered and every prompt drawn for them (seeded).

    The demo, the analyses, the transfer report and the benchmarks all draw their prompts here,
    so a change to the protocol is made once.
    """

    emotions: tuple[str, ...]
    """Emotions whose vectors are refined and transplanted (a subset of the six)."""
    refine_scenarios: dict[str, list[str]]
    """The refinement half of every emotion's scenarios (vectors, few-shot block, validation)."""
    eval_scenarios: dict[str, list[str]]
    """The evaluation half: held out from everything that is chosen or fitted."""
    prefix: str
    """Few-shot block (one solved example per emotion, from the refinement half)."""
    n_refine: int | None
    """Refinement scenarios per side (None: the whole refinement half)."""
    n_eval: int | None
    """Evaluation scenarios per *other* emotion (None: all of them)."""
    seed: int

    def contrast(self, emotion: str, n: int | None = None) -> tuple[list[str], list[str]]:
        """Refinement prompts: ``n`` (default ``n_refine``) scenarios of ``emotion`` against as many others."""
        return contrast_prompts(self.refine_scenarios, emotion, n=self.n_refine if n is None else n, seed=self.seed)

    def negatives(self, emotion: str, *, held_out: bool = True, k: int | None = None) -> list[str]:
        """Scenarios of every other emotion, ``k`` each (default ``n_eval``), raw (no query).

        ``held_out=False`` draws them from the refinement half instead (for choosing layer and alpha).
        """
        pool = self.eval_scenarios if held_out else self.refine_scenarios
        k = self.n_eval if k is None else k
        return [s for e in EMOTIONS if e != emotion and e in pool for s in pool[e][:k]]

    def negative_prompts(self, emotion: str) -> list[str]:
        """:meth:`negatives` formatted with the refinement query (for lens read-outs)."""
        return [QUERY.format(s) for s in self.negatives(emotion)]

    def refine_all(self, model: ModelHandle, *, batch_size: int = 16) -> dict[str, ConceptVector]:
        """One mean-difference vector per steered emotion (all layers), refined in ``model``."""
        out = {}
        for emotion in self.emotions:
            pos, neg = self.contrast(emotion)
            out[emotion] = refine(model, pos, neg, batch_size=batch_size)
        return out

    def answer(
        self,
        model: ModelHandle,
        scenarios: Sequence[str],
        *,
        vector: ConceptVector | None = None,
        alpha: float = 0.0,
        layers: Sequence[int] | None = None,
        unit: Unit = "norm",
        batch_size: int = 16,
    ) -> Answers:
        """The model's answers to ``scenarios`` with ``vector`` transplanted at ``alpha`` (none or 0: unsteered)."""
        steer = vector is not None and alpha != 0
        context = transplant(model, vector, alpha=alpha, layers=layers, unit=unit) if steer else nullcontext()
        with context:
            return answers(model, scenarios, prefix=self.prefix, batch_size=batch_size)

    def score(
        self,
        model: ModelHandle,
        emotion: str,
        scenarios: Sequence[str] | None = None,
        *,
        vector: ConceptVector | None = None,
        alpha: float = 0.0,
        layers: Sequence[int] | None = None,
        unit: Unit = "norm",
        batch_size: int = 16,
    ) -> dict[str, Any]:
        """Token/Logit Acc of answering ``emotion`` on ``scenarios`` (default: its held-out
        negatives) with ``vector`` transplanted at ``alpha``; no vector or ``alpha == 0`` is the baseline."""
        scenarios = self.negatives(emotion) if scenarios is None else scenarios
        return self.answer(model, scenarios, vector=vector, alpha=alpha, layers=layers, unit=unit,
                           batch_size=batch_size).accuracy(emotion)

    def describe(self) -> dict[str, Any]:
        return {
            "emotions": list(self.emotions),
            "n_refine_per_side": len(self.contrast(self.emotions[0])[0]),
            "n_eval_per_other_emotion": self.n_eval,
            "n_negatives_per_emotion": len(self.negatives(self.emotions[0])),
            "seed": self.seed,
        }


def emotion_task(
    emotions: Sequence[str] = EMOTIONS,
    *,
    n_refine: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
    data_dir: str | None = None,
) -> EmotionTask:
    """Split the scenarios (built-in, or ``data_dir`` in the same format) once for a run."""
    bad = [e for e in emotions if e not in EMOTIONS]
    if bad or not emotions:
        raise InvalidArgumentError("emotions", list(emotions), f"a non-empty subset of {list(EMOTIONS)}")
    split = split_scenarios(emotion_scenarios(data_dir), seed=seed)
    return EmotionTask(
        tuple(emotions), split.refine, split.evaluate, few_shot_prefix(split.refine, seed=seed), n_refine, n_eval, seed
    )
