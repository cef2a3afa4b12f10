"""The fairness section of the alignment evaluation: ToxiGen toxicity (paper §5, Table 3).

Non-toxic ToxiGen prompts are the positives, toxic ones the negatives. Scored by the share of
greedy continuations of held-out toxic prompts that a toxicity classifier flags: ToxiGen
RoBERTa when the hub is reachable, else alt-profanity-check (trained on other data, so
independent of the prompts that refine the vector), or any callable plugged in; the JSON and
the table name the scorer. Alpha is chosen on validation prompts, among the alphas that keep
KL to the unsteered model on generic text within ``kl_bound`` (the fluency instrument; the honesty search's bound).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import contrans_tl as ct
from contrans_tl.artifacts import ConceptVector
from contrans_tl.errors import DataUnavailableError, InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks.prompts import FAIR_INSTRUCTION, with_instruction
from contrans_tl.tasks.concept import GenerationItem, continuations
from contrans_tl.tasks.toxigen import (
    ToxiGenPrompt,
    fairness_concept,
    first_item,
    load_toxigen_prompts,
    scorer_info,
    toxicity_scorer,
    toxicity_summary,
    toxigen_continuation_prompt,
)

from contrans_tl.analyses.alignment_setup import (
    AlignmentRun,
    Config,
    Steer,
    choose_under_bound,
    concept_vectors,
    data_path,
    perplexity_rows,
    steered,
)

__all__ = ["FairnessOutcome", "fairness", "generate_items"]

Toxicity = Callable[[list[str]], dict[str, Any]]
"""Texts → the toxicity summary of the run's scorer."""


@dataclass
class FairnessOutcome:
    """The fairness section for the JSON, and what the multi-concept table reuses."""

    result: dict[str, Any]
    chosen: dict[str, list[Steer]]
    """Per steered condition, the chosen (vector, alpha, layers)."""
    tox: Toxicity
    test_prompts: list[str]


def generate_items(run: AlignmentRun, model: ModelHandle, prompts: list[str], steers: Sequence[Steer] = ()) -> list[str]:
    """The next list item a model writes after each ToxiGen prompt (greedy), with ``steers`` applied."""
    with steered(model, steers, run.cfg.unit):
        return continuations(model, [GenerationItem(p) for p in prompts], max_new_tokens=run.cfg.max_new_tokens,
                             batch_size=run.cfg.gen_batch_size, postprocess=first_item)


def _split_prompts(cfg: Config) -> tuple[list[ToxiGenPrompt], list[ToxiGenPrompt], list[ToxiGenPrompt], list[ToxiGenPrompt]]:
    """Seeded, disjoint (test, validation, concept-hateful, concept-neutral) ToxiGen prompts."""
    path = data_path(cfg, cfg.toxigen, "toxigen")
    if path is None:
        raise DataUnavailableError("fairness needs --toxigen or --data-dir with toxigen/prompts/")
    prompts = load_toxigen_prompts(path)
    rng = random.Random(cfg.seed + 2)
    hate = [p for p in prompts if p.toxic]
    neutral = [p for p in prompts if not p.toxic]
    rng.shuffle(hate)
    rng.shuffle(neutral)
    n_t, n_v, n_c = cfg.n_toxigen_test, cfg.n_toxigen_val, cfg.n_toxigen_concept
    if len(hate) < n_t + n_v + n_c or len(neutral) < n_c:
        raise InvalidArgumentError(
            "n_toxigen_test, n_toxigen_val, n_toxigen_concept", (n_t, n_v, n_c),
            f"counts the data holds: {len(hate)} hateful prompts for test + validation + concept, "
            f"{len(neutral)} neutral for concept",
        )
    return hate[:n_t], hate[n_t : n_t + n_v], hate[n_t + n_v : n_t + n_v + n_c], neutral[:n_c]


def _choose(run: AlignmentRun, cond: str, vec: ConceptVector, val_p: list[str], tox: Toxicity,
            base_val: dict[str, Any]) -> tuple[Steer, dict[str, Any]]:
    """The grid point with the lowest mean validation score among those within the fluency bound."""
    def validation_score(point: tuple[tuple[int, ...], float]) -> float:
        layers, alpha = point
        return (base_val if alpha == 0 else tox(generate_items(run, run.target, val_p, [(vec, alpha, layers)])))["mean_score"]

    return choose_under_bound(run, vec, validation_score, maximize=False, key=("fairness", cond))


def _unsteered_rows(run: AlignmentRun, test_p: list[str], tox: Toxicity, rows: dict[str, Any]) -> None:
    """Inst-Align (the fairness instruction before every prompt) and Align-Training (the instruct model)."""
    cfg = run.cfg
    if "inst-align" in cfg.conditions:
        with run.timed("toxigen_inst_align"):
            texts = generate_items(run, run.target, [with_instruction(FAIR_INSTRUCTION, p) for p in test_p])
        rows["inst-align"] = {**tox(texts), "instruction": FAIR_INSTRUCTION, "examples": texts[:3]}
    if "align-training" in cfg.conditions and run.instruct is not None:
        with run.timed("toxigen_align_training"):
            texts = generate_items(run, run.instruct, test_p)
        rows["align-training"] = {**tox(texts), "model": cfg.instruct_model, "examples": texts[:3]}


def fairness(run: AlignmentRun) -> FairnessOutcome:
    """Every configured row of the fairness table, with the chosen alphas and perplexity."""
    cfg = run.cfg
    test, val, concept_neg, concept_pos = _split_prompts(cfg)
    concept = fairness_concept(concept_pos + concept_neg, test)  # contrast prompts, and the test prompts as items
    test_p = [it.prompt for it in concept.items]
    val_p = [toxigen_continuation_prompt(p) for p in val]
    pos, neg = list(concept.positive), list(concept.negative)
    scorer = toxicity_scorer(cfg.toxicity_scorer, [p.text for p in concept_neg], [p.text for p in concept_pos])
    info = scorer_info(scorer)
    run.log(f"fairness: {len(test)} test / {len(val)} validation prompts; scorer: {info['name']}")

    def tox(texts: list[str]) -> dict[str, Any]:
        return toxicity_summary(scorer, texts)

    rows: dict[str, Any] = {}
    with run.timed("toxigen_base"):
        base_val = tox(generate_items(run, run.target, val_p))
        if "base" in cfg.conditions:
            base_test = generate_items(run, run.target, test_p)
            rows["base"] = {**tox(base_test), "examples": base_test[:3]}
    chosen: dict[str, list[Steer]] = {}
    search: dict[str, Any] = {}
    for cond, vec in concept_vectors(run, lambda _model: (pos, neg)).items():
        with run.timed(f"toxigen_search_{cond}"):
            steer, search[cond] = _choose(run, cond, vec, val_p, tox, base_val)
        chosen[cond] = [steer]
        with run.timed(f"toxigen_test_{cond}"):
            texts = generate_items(run, run.target, test_p, chosen[cond])
        rows[cond] = {**tox(texts), "alpha": steer[1], "layers": list(steer[2]), "examples": texts[:3]}
    _unsteered_rows(run, test_p, tox, rows)
    perplexity_rows(run, rows, dict(chosen), FAIR_INSTRUCTION)
    result = {
        "concept": "fairness",
        "scorer": info,
        "n_test_prompts": len(test),
        "n_validation_prompts": len(val),
        "selection": f"lowest mean validation score with KL on generic text <= {cfg.kl_bound} nats/token",
        "fluency": run.fluency_record(),
        "search": search,
        "rows": rows,
    }
    return FairnessOutcome(result, chosen, tox, test_p)
