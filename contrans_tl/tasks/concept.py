"""The concept task: contrast prompts make the vector, items with choices score it.

One task for every concept the toolkit moves: the six emotions, TruthfulQA's honesty, and any
concept a researcher writes in a concept file (docs/concepts.md). A :class:`Concept` holds

* ``positive[i]`` / ``negative[i]``: matched contrast prompts (step 1 refines their mean difference);
* ``items``: prompts with choices and a target choice. Under a steering, an item counts for
  **Logit Acc** when the target choice scores strictly highest among its choices (each choice
  scored by the sum of its tokens' log-probabilities after the prompt) and for **Token Acc**
  when the target choice's first token is the argmax over the whole vocabulary. A concept whose
  behaviour is judged on what the model writes (ToxiGen's fairness) holds :class:`GenerationItem`
  prompts instead, whose :func:`continuations` a text scorer judges;
* optionally a shared ``prefix`` before every item (a few-shot block), an ``instruction`` for the
  prompting baseline, and unlabeled ``domain`` text (a map corpus option, never scored).

Items are split into validation (choices are made there) and test (numbers are reported
there) by :func:`split_concept`, seeded and recorded.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from contrans_tl.errors import ConceptFileError, InvalidArgumentError
from contrans_tl.files import atomic_write_text
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks.scoring import ChoiceLogprobs, choice_logprobs

__all__ = [
    "ChoiceItem",
    "GenerationItem",
    "Concept",
    "CONCEPT_KEYS",
    "concept_from_dict",
    "concept_to_dict",
    "load_concept",
    "save_concept",
    "ConceptSplit",
    "split_concept",
    "check_held_out",
    "ItemScores",
    "item_scores",
    "score_items",
    "prompted_items",
    "continuations",
]

CONCEPT_KEYS = {"name": "a non-empty string", "description": "a string", "positive": "a list of prompts",
                "negative": "a list of prompts, as many as positive", "eval": "a list of items "
                '{"prompt": "...", "choices": ["...", "..."], "target": 0}',
                "prefix": "a string shared before every item prompt", "instruction": "a string (prompting baseline)",
                "domain": "a list of unlabeled texts of the concept's domain"}
"""The keys of a concept file and what each holds; name, positive, negative and eval are required."""


@dataclass(frozen=True)
class ChoiceItem:
    """One scored item: a prompt, two or more choices, and the index of the choice the concept should win."""

    prompt: str
    choices: tuple[str, ...]
    target: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgumentError("prompt", self.prompt, "a non-empty string")
        choices = tuple(self.choices) if isinstance(self.choices, (list, tuple)) else self.choices
        if not isinstance(choices, tuple) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise InvalidArgumentError("choices", self.choices, "two or more non-empty strings")
        if len(set(choices)) != len(choices):
            raise InvalidArgumentError("choices", self.choices, "distinct choices")
        object.__setattr__(self, "choices", choices)
        if isinstance(self.target, bool) or not isinstance(self.target, int) or not 0 <= self.target < len(choices):
            raise InvalidArgumentError("target", self.target, f"an index into the {len(choices)} choices (0..{len(choices) - 1})")


@dataclass(frozen=True)
class GenerationItem:
    """An item judged on the model's own continuation of ``prompt`` (by a text scorer: a toxicity classifier, say)."""

    prompt: str

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidArgumentError("prompt", self.prompt, "a non-empty string")


@dataclass(frozen=True)
class Concept:
    """A concept to refine, transplant and score (see the module docstring)."""

    name: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    items: tuple[ChoiceItem | GenerationItem, ...]
    description: str = ""
    prefix: str = ""
    """Text before every item prompt (a few-shot block), run once and shared."""
    instruction: str | None = None
    """The prompting baseline's preface: ``instruction + "\\n" + prompt`` instead of steering (None: no such row)."""
    domain: tuple[str, ...] = field(default=(), repr=False)
    """Unlabeled text of the concept's domain (a map corpus option; never an evaluation item)."""
    source: str = field(default="concept", compare=False, repr=False)
    """Where the concept came from (a file path), named in its errors."""

    def __post_init__(self) -> None:
        for key in ("positive", "negative", "items", "domain"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _check_concept(self, self.source)

    @property
    def contrast_texts(self) -> list[str]:
        """Every contrast prompt and domain text, once each: the concept's own text for a map corpus."""
        return list(dict.fromkeys([*self.positive, *self.negative, *self.domain]))


def _fail(source: str, key: str, problem: str) -> ConceptFileError:
    return ConceptFileError(f"{source}: {key}: {problem}")


def _check_concept(c: Concept, source: str) -> None:
    """The rules of a concept: matched non-empty pairs, distinct items, no evaluation prompt among the contrast prompts."""
    if not isinstance(c.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", c.name):
        raise _fail(source, "name", f"{c.name!r} is not accepted: expected a short name of letters, digits, '.', '_', '+' "
                    "or '-' (it names files and rows)")
    for key in ("positive", "negative"):
        values = getattr(c, key)
        if not values:
            raise _fail(source, key, "expected a non-empty list of prompts")
        bad = [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]
        if bad:
            raise _fail(source, f"{key}[{bad[0]}]", "expected a non-empty string")
    if len(c.positive) != len(c.negative):
        raise _fail(source, "negative", f"{len(c.negative)} prompts for {len(c.positive)} positive ones: "
                    "positive[i] and negative[i] are matched pairs, so the lists need equal lengths")
    same = [i for i, (p, n) in enumerate(zip(c.positive, c.negative)) if p == n]
    if same:
        raise _fail(source, f"negative[{same[0]}]", f"equals positive[{same[0]}]: a pair needs two different prompts")
    pairs = list(zip(c.positive, c.negative))
    if len(set(pairs)) != len(pairs):
        first = next(i for i, p in enumerate(pairs) if pairs.index(p) != i)
        raise _fail(source, f"positive[{first}]/negative[{first}]", "a duplicate pair (every pair once)")
    if not c.items:
        raise _fail(source, "eval", "expected a non-empty list of items")
    keys = [(it.prompt, getattr(it, "choices", ())) for it in c.items]
    if len(set(keys)) != len(keys):
        first = next(i for i, k in enumerate(keys) if keys.index(k) != i)
        raise _fail(source, f"eval[{first}]", "a duplicate item (same prompt and choices as an earlier one)")
    contrast = set(c.positive) | set(c.negative)
    leaked = [i for i, it in enumerate(c.items) if it.prompt in contrast]
    if leaked:
        raise _fail(source, f"eval[{leaked[0]}].prompt", "is also a contrast prompt: evaluation items must be "
                    "held out of the prompts that make the vector")
    if c.instruction is not None and (not isinstance(c.instruction, str) or not c.instruction.strip()):
        raise _fail(source, "instruction", "expected a non-empty string (or leave the key out)")


def _string_list(data: Mapping[str, Any], key: str, source: str, *, required: bool) -> tuple[str, ...]:
    value = data.get(key, [] if not required else None)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(source, key, f"expected {CONCEPT_KEYS[key]} (JSON strings)")
    return tuple(value)


def _item(raw: Any, i: int, source: str) -> ChoiceItem:
    if not isinstance(raw, dict) or set(raw) - {"prompt", "choices", "target"} or not {"prompt", "choices", "target"} <= set(raw):
        raise _fail(source, f"eval[{i}]", 'expected {"prompt": "...", "choices": ["...", "..."], "target": <index>}')
    if not isinstance(raw["choices"], list):
        raise _fail(source, f"eval[{i}].choices", "expected a list of two or more strings")
    try:
        return ChoiceItem(raw["prompt"], tuple(raw["choices"]), raw["target"])
    except InvalidArgumentError as err:
        raise _fail(source, f"eval[{i}].{err.argument}", f"{err.value!r} is not accepted: expected {err.accepted}") from None


def concept_from_dict(data: Any, *, source: str = "concept") -> Concept:
    """A :class:`Concept` from the JSON structure of a concept file; :class:`ConceptFileError` names what is wrong."""
    if not isinstance(data, dict):
        raise ConceptFileError(f"{source}: expected a JSON object with keys {', '.join(CONCEPT_KEYS)}")
    unknown = sorted(set(data) - set(CONCEPT_KEYS))
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; a concept file has {', '.join(CONCEPT_KEYS)}")
    missing = [k for k in ("name", "positive", "negative", "eval") if k not in data]
    if missing:
        raise _fail(source, missing[0], f"missing: expected {CONCEPT_KEYS[missing[0]]}")
    for key in ("name", "description", "prefix", "instruction"):
        if key in data and not isinstance(data[key], str):
            raise _fail(source, key, f"expected {CONCEPT_KEYS[key]}")
    if not isinstance(data["eval"], list):
        raise _fail(source, "eval", f"expected {CONCEPT_KEYS['eval']}")
    return Concept(name=data["name"], positive=_string_list(data, "positive", source, required=True),
                   negative=_string_list(data, "negative", source, required=True),
                   items=tuple(_item(raw, i, source) for i, raw in enumerate(data["eval"])),
                   description=data.get("description", ""), prefix=data.get("prefix", ""),
                   instruction=data.get("instruction"), domain=_string_list(data, "domain", source, required=False),
                   source=source)


def load_concept(path: str | Path) -> Concept:
    """Read a concept file (UTF-8 JSON, docs/concepts.md); every malformed case is a :class:`ConceptFileError`."""
    path = Path(path)
    if not path.is_file():
        raise ConceptFileError(f"{path}: no such concept file")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConceptFileError(f"{path}: not UTF-8 text (byte {err.start}): a concept file is UTF-8 JSON") from None
    except json.JSONDecodeError as err:
        raise ConceptFileError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return concept_from_dict(data, source=str(path))


def concept_to_dict(concept: Concept) -> dict[str, Any]:
    """The concept file's JSON structure (what :func:`concept_from_dict` reads)."""
    out: dict[str, Any] = {"name": concept.name, "description": concept.description,
                           "positive": list(concept.positive), "negative": list(concept.negative),
                           "eval": [{"prompt": it.prompt, "choices": list(it.choices), "target": it.target}
                                    for it in concept.items]}
    if concept.prefix:
        out["prefix"] = concept.prefix
    if concept.instruction is not None:
        out["instruction"] = concept.instruction
    if concept.domain:
        out["domain"] = list(concept.domain)
    return out


def save_concept(concept: Concept, path: str | Path) -> Path:
    """Write ``concept`` as a concept file (atomically)."""
    path = Path(path)
    atomic_write_text(path, json.dumps(concept_to_dict(concept), indent=1, ensure_ascii=False) + "\n")
    return path


# ---- validation and test -------------------------------------------------------------------------
@dataclass(frozen=True)
class ConceptSplit:
    """The items a run chooses on (validation) and the items it reports (test): disjoint."""

    validation: tuple[ChoiceItem, ...]
    test: tuple[ChoiceItem, ...]
    how: dict[str, Any] = field(default_factory=dict)
    """How the split was made (seed, indices into the concept's items), for results.json."""

    def __post_init__(self) -> None:
        if not self.validation or not self.test:
            raise InvalidArgumentError("split", (len(self.validation), len(self.test)), "validation and test items, both non-empty")
        shared = ({(it.prompt, getattr(it, "choices", ())) for it in self.validation}
                  & {(it.prompt, getattr(it, "choices", ())) for it in self.test})
        if shared:
            raise InvalidArgumentError("split", sorted(shared)[:1], "validation and test items that do not overlap")


def split_concept(concept: Concept, *, validation_fraction: float = 0.3, min_validation: int = 3, min_test: int = 5,
                  seed: int = 0) -> ConceptSplit:
    """Seeded split of ``concept.items``: ``validation_fraction`` of them (at least ``min_validation``) validate,
    the rest (at least ``min_test``) are the test set; :class:`ConceptFileError` when there are too few items."""
    n = len(concept.items)
    n_val = max(min_validation, round(validation_fraction * n))
    if n - n_val < min_test:
        raise ConceptFileError(f"{concept.source}: eval: {n} items, fewer than the split needs: at least "
                               f"{min_validation + min_test} ({min_validation} validation + {min_test} test at "
                               f"validation fraction {validation_fraction:g})")
    order = list(range(n))
    random.Random(f"split-{seed}-{concept.name}").shuffle(order)
    val, test = sorted(order[:n_val]), sorted(order[n_val:])
    return ConceptSplit(tuple(concept.items[i] for i in val), tuple(concept.items[i] for i in test),
                        {"seed": seed, "validation_fraction": validation_fraction, "validation": val, "test": test})


def check_held_out(concept: Concept, split: ConceptSplit) -> None:
    """Raise :class:`InvalidArgumentError` when a validation or test item leaks into what makes or frames the
    vector: its prompt is a contrast prompt, or it appears in the shared prefix (a few-shot example)."""
    contrast = set(concept.positive) | set(concept.negative)
    for part, items in (("validation", split.validation), ("test", split.test)):
        for i, it in enumerate(items):
            if it.prompt in contrast:
                raise InvalidArgumentError(f"{part}[{i}]", it.prompt[:60], f"an item held out of {concept.name}'s contrast prompts")
            if any(it.prompt in text for text in concept.domain):
                raise InvalidArgumentError(f"{part}[{i}]", it.prompt[:60], f"an item held out of {concept.name}'s domain "
                                           "text (a map corpus option)")
            if concept.prefix and it.prompt in concept.prefix:
                raise InvalidArgumentError(f"{part}[{i}]", it.prompt[:60], f"an item held out of {concept.name}'s "
                                           "shared prefix (few-shot examples)")


def prompted_items(items: Sequence[ChoiceItem], instruction: str) -> tuple[ChoiceItem, ...]:
    """The prompting baseline's items: the concept named in a preface before each prompt instead of steered."""
    return tuple(ChoiceItem(f"{instruction}\n{it.prompt}", it.choices, it.target) for it in items)


# ---- scoring -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemScores:
    """Per item, under one steering: Logit (target choice strictly best) and Token (target's first token
    is the vocabulary argmax) outcomes, and the index of the best-scored choice."""

    logit: tuple[bool, ...]
    token: tuple[bool, ...]
    predicted: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.logit)

    @property
    def logit_acc(self) -> float:
        return sum(self.logit) / self.n if self.n else float("nan")

    @property
    def token_acc(self) -> float:
        return sum(self.token) / self.n if self.n else float("nan")


def item_scores(items: Sequence[ChoiceItem], scored: ChoiceLogprobs) -> ItemScores:
    """Outcomes of ``items`` from their choices' log-probabilities (ties for the best choice count as misses)."""
    logit, token, predicted = [], [], []
    for it, lps, firsts, top in zip(items, scored.logprobs, scored.first_tokens, scored.top):
        best = max(lps)
        predicted.append(lps.index(best))
        logit.append(lps[it.target] == best and lps.count(best) == 1)
        token.append(firsts[it.target] == top)
    return ItemScores(tuple(logit), tuple(token), tuple(predicted))


def score_items(model: ModelHandle, items: Sequence[ChoiceItem], *, prefix: str = "", batch_size: int = 16,
                progress: str | None = None) -> ItemScores:
    """Logit and Token outcomes of ``items`` (under any active steering), after ``prefix``."""
    items = list(items)
    if not items or not all(isinstance(it, ChoiceItem) for it in items):
        raise InvalidArgumentError("items", items[:2], "a non-empty list of ChoiceItems (GenerationItems are judged "
                                   "on their continuations by a text scorer)")
    scored = choice_logprobs(model, [it.prompt for it in items], [list(it.choices) for it in items],
                             prefix=prefix or None, batch_size=batch_size, progress=progress)
    return item_scores(items, scored)


def continuations(model: ModelHandle, items: Sequence[GenerationItem], *, max_new_tokens: int = 20, batch_size: int = 4,
                  postprocess: Callable[[str], str] = str.strip) -> list[str]:
    """Greedy continuations of ``items`` (under any active steering), post-processed: what a text scorer judges."""
    from contrans_tl.transplant import generate

    prompts = [it.prompt for it in items]
    if not prompts:
        raise InvalidArgumentError("items", list(items), "at least one GenerationItem")
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts += [postprocess(t) for t in generate(model, prompts[start : start + batch_size], max_new_tokens=max_new_tokens)]
    return texts
