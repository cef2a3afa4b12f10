"""The emotion task of the paper (§4): six instances of the concept task (:mod:`contrans_tl.tasks.concept`).

A concept vector for emotion e is refined from scenarios of e (positives) against as many
scenarios of the other five (negatives, seeded), all in the refinement prompt. Its items are
scenarios of the *other* emotions (the paper's negatives) after a few-shot block (one solved
example per emotion) and the same query; the choices are the six label words and the target is
e's: Logit Acc = e's label scores highest among the six (each label scored by the sum of its
tokens' log-probabilities), Token Acc = e's label's first token is the argmax over the vocabulary.

Scenarios are split into a refinement half and an evaluation half (test items). With
``n_validation`` the first scenarios of each refinement half are kept out of the contrast
prompts and the few-shot block: they are the validation items on which settings are chosen.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.datasets import check_scenarios, data_dir
from contrans_tl.errors import DataFormatError, EmptyPromptsError, InvalidArgumentError, LabelTokenError
from contrans_tl.handle import ModelHandle
from contrans_tl.refine import refine
from contrans_tl.tasks.concept import ChoiceItem, Concept, ConceptSplit, ItemScores, score_items
from contrans_tl.tasks.scoring import choice_logprobs
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
    "LABEL_CHOICES",
    "INSTRUCTION",
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
"""The word a model should answer for each emotion."""

LABEL_CHOICES: tuple[str, ...] = tuple(f" {LABELS[e]}" for e in EMOTIONS)
"""The choices of every emotion item: the six label words after a space, in :data:`EMOTIONS` order."""

INSTRUCTION = "In every scenario below, the emotion is {label}."
"""The prompting baseline's preface (AxBench's lesson: name the concept instead of steering it)."""


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
    return check_scenarios(out, root)


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


@dataclass(frozen=True)
class EmotionTask:
    """The emotion task of one run: which emotions are steered and every prompt drawn for them (seeded).

    The demo, the analyses, the transfer report and the benchmarks all draw their prompts and
    items here, and score them through the concept task, so a change to the protocol is made once.
    """

    emotions: tuple[str, ...]
    """Emotions whose vectors are refined and transplanted (a subset of the six)."""
    refine_scenarios: dict[str, list[str]]
    """The refinement half of every emotion's scenarios, less the validation ones (contrast prompts, few-shot block)."""
    eval_scenarios: dict[str, list[str]]
    """The evaluation half: held out from everything that is chosen or fitted (test items)."""
    prefix: str
    """Few-shot block (one solved example per emotion, from :attr:`refine_scenarios`)."""
    n_refine: int | None
    """Refinement scenarios per side (None: the whole refinement pool)."""
    n_eval: int | None
    """Evaluation scenarios per *other* emotion (None: all of them)."""
    seed: int
    validation_scenarios: dict[str, list[str]] = field(default_factory=dict)
    """Scenarios kept out of the contrast prompts and the few-shot block: the validation items."""

    def contrast(self, emotion: str, n: int | None = None) -> tuple[list[str], list[str]]:
        """Refinement prompts: ``n`` (default ``n_refine``) scenarios of ``emotion`` against as many others."""
        return contrast_prompts(self.refine_scenarios, emotion, n=self.n_refine if n is None else n, seed=self.seed)

    def negatives(self, emotion: str, *, held_out: bool = True, k: int | None = None) -> list[str]:
        """Scenarios of every other emotion, ``k`` each (default ``n_eval``), raw (no query).

        ``held_out=False`` draws them from the validation scenarios instead (for choosing settings).
        """
        pool = self.eval_scenarios if held_out else self.validation_scenarios
        k = self.n_eval if held_out and k is None else k
        return [s for e in EMOTIONS if e != emotion and e in pool for s in pool[e][:k]]

    def negative_prompts(self, emotion: str) -> list[str]:
        """:meth:`negatives` formatted with the refinement query (for lens read-outs)."""
        return [QUERY.format(s) for s in self.negatives(emotion)]

    def items(self, emotion: str, scenarios: Sequence[str]) -> list[ChoiceItem]:
        """``scenarios`` as items of ``emotion``: the query, the six label words, ``emotion``'s label the target."""
        if emotion not in EMOTIONS:
            raise InvalidArgumentError("emotion", emotion, f"one of {list(EMOTIONS)}")
        return [ChoiceItem(QUERY.format(s), LABEL_CHOICES, EMOTIONS.index(emotion)) for s in scenarios]

    def concept(self, emotion: str) -> Concept:
        """``emotion`` as a concept: its contrast prompts, its test items (held-out negatives), the few-shot
        block as the shared prefix and the prompting baseline's instruction."""
        pos, neg = self.contrast(emotion)
        return Concept(emotion, tuple(pos), tuple(neg), tuple(self.items(emotion, self.negatives(emotion))),
                       description=f"the emotion {emotion}: the model answers {LABELS[emotion]!r} for scenarios of "
                       "other emotions", prefix=self.prefix, instruction=INSTRUCTION.format(label=LABELS[emotion]),
                       source=f"built-in emotion {emotion}")

    def concept_split(self, emotion: str) -> ConceptSplit:
        """Validation items (the reserved scenarios of the other emotions) and test items (held-out negatives)."""
        return ConceptSplit(tuple(self.items(emotion, self.negatives(emotion, held_out=False))),
                            tuple(self.items(emotion, self.negatives(emotion))),
                            {"validation": f"{len(next(iter(self.validation_scenarios.values()), []))} reserved scenarios "
                                           "per other emotion (refinement half, kept out of contrast prompts and shots)",
                             "test": f"{self.n_eval} evaluation-half scenarios per other emotion", "seed": self.seed})

    def refine_all(self, model: ModelHandle, *, batch_size: int = 16) -> dict[str, ConceptVector]:
        """One mean-difference vector per steered emotion (all layers), refined in ``model``."""
        out = {}
        for emotion in self.emotions:
            pos, neg = self.contrast(emotion)
            out[emotion] = refine(model, pos, neg, batch_size=batch_size)
        return out

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
        """Token/Logit Acc of answering ``emotion`` on ``scenarios`` (default: its held-out negatives) with
        ``vector`` transplanted at ``alpha`` (none or 0: the baseline), and which label won per scenario."""
        scenarios = self.negatives(emotion) if scenarios is None else scenarios
        steer = vector is not None and alpha != 0
        context = transplant(model, vector, alpha=alpha, layers=layers, unit=unit) if steer else nullcontext()
        with context:
            scores = score_items(model, self.items(emotion, scenarios), prefix=self.prefix, batch_size=batch_size)
        return emotion_accuracy(scores)

    def label_probability(self, model: ModelHandle, emotion: str, scenarios: Sequence[str] | None = None, *,
                          batch_size: int = 16) -> float:
        """Mean probability of ``emotion``'s label among the six (softmax of their summed log-probs; a smooth
        Logit Acc), on ``scenarios`` (default: its held-out negatives), under any active steering."""
        scenarios = self.negatives(emotion) if scenarios is None else scenarios
        items = self.items(emotion, scenarios)
        scored = choice_logprobs(model, [it.prompt for it in items], [list(it.choices) for it in items],
                                 prefix=self.prefix, batch_size=batch_size)
        lp = torch.tensor(scored.logprobs, dtype=torch.float64)
        return float(torch.softmax(lp, -1)[:, EMOTIONS.index(emotion)].mean())

    def describe(self) -> dict[str, Any]:
        return {
            "emotions": list(self.emotions),
            "n_refine_per_side": len(self.contrast(self.emotions[0])[0]),
            "n_eval_per_other_emotion": self.n_eval,
            "n_negatives_per_emotion": len(self.negatives(self.emotions[0])),
            "n_validation_per_emotion": len(next(iter(self.validation_scenarios.values()), [])),
            "seed": self.seed,
        }


def emotion_accuracy(scores: ItemScores) -> dict[str, Any]:
    """Token and Logit Acc of emotion items, how often each label won (a row of the transplant matrix), and each
    item's outcomes in item order (0/1), so two steerings of the same items compare paired."""
    return {"token_acc": scores.token_acc, "logit_acc": scores.logit_acc, "n": scores.n,
            "label_counts": {e: sum(1 for p in scores.predicted if p == i) for i, e in enumerate(EMOTIONS)},
            "logit_hits": [int(x) for x in scores.logit], "token_hits": [int(x) for x in scores.token]}


def emotion_task(
    emotions: Sequence[str] = EMOTIONS,
    *,
    n_refine: int | None = None,
    n_eval: int | None = None,
    n_validation: int = 0,
    seed: int = 0,
    data_dir: str | None = None,
) -> EmotionTask:
    """Split the scenarios (built-in, or ``data_dir`` in the same format) once for a run; with ``n_validation``
    the first scenarios of every refinement half are kept out of the contrast prompts and the few-shot block."""
    bad = [e for e in emotions if e not in EMOTIONS]
    if bad or not emotions:
        raise InvalidArgumentError("emotions", list(emotions), f"a non-empty subset of {list(EMOTIONS)}")
    split = split_scenarios(emotion_scenarios(data_dir), seed=seed)
    smallest = min(len(v) for v in split.refine.values())
    if not isinstance(n_validation, int) or not 0 <= n_validation <= smallest - 2:
        raise InvalidArgumentError("n_validation", n_validation, f"0 to {smallest - 2} (scenarios per emotion kept "
                                   "out of a refinement half, leaving two for the contrast prompts)")
    validation = {e: items[:n_validation] for e, items in split.refine.items()}
    pool = {e: items[n_validation:] for e, items in split.refine.items()}
    return EmotionTask(tuple(emotions), pool, split.evaluate, few_shot_prefix(pool, seed=seed), n_refine, n_eval, seed,
                       validation)
