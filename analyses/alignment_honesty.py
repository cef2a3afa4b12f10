"""The honesty section of the alignment evaluation: TruthfulQA MC1 (paper §5, Table 2).

Contrast prompts are TruthfulQA questions after the honest / dishonest persona (through the
model's chat template when it has one), or true fact statements ("facts", honesty-fact). Each
fold's vectors are refined on questions outside both its validation and its test questions;
alpha and layers are chosen on its validation questions among the grid points within the
fluency bound (KL to the unsteered model on generic text <= ``kl_bound``), and MC1 is
reported on its test questions only, with a 95 % Wilson interval.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from contrans_tl.artifacts import ConceptVector
from contrans_tl.errors import DataUnavailableError, InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.metrics import wilson_interval
from contrans_tl.sweep import cell_key
from contrans_tl.tasks.prompts import HONEST_PERSONA
from contrans_tl.tasks.selection import Split, selection_splits
from contrans_tl.tasks.truthfulqa import (
    MC1Result,
    MCQuestion,
    honesty_fact_prompts,
    honesty_prompts,
    load_facts,
    load_truthfulqa,
    mc1_from_scores,
    mc_prompt,
    score_mc1,
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

__all__ = ["MCScores", "HonestyOutcome", "honesty", "load_questions"]


class MCScores:
    """Per-choice MC1 scores of one model, kept per (condition key, question) in memory and,
    through the run's cell store, on disk (written every ``CHUNK`` questions)."""

    CHUNK = 64

    def __init__(self, run: AlignmentRun, model: ModelHandle, questions: list[MCQuestion],
                 instruction: str | None = None, chat: str | None = None, *, tag: str) -> None:
        self.run, self.model, self.questions, self.tag = run, model, questions, tag
        cfg = run.cfg
        built = [mc_prompt(q.question, tokenizer=model.tokenizer, chat=(chat or cfg.target_chat),  # type: ignore[arg-type]
                           style=cfg.prompt_style, instruction=instruction) for q in questions]  # type: ignore[arg-type]
        self.prompts = [p for p, _ in built]
        self.seps = [s for _, s in built]
        self.cache: dict[tuple[Any, int], list[float]] = {}

    def _cell(self, key: Any, i: int) -> str:
        return cell_key(model=self.tag, cond=key, q=i)

    def _todo(self, key: Any, idx: Sequence[int]) -> list[int]:
        """Questions of ``idx`` not yet scored under ``key`` (stored cells are read into the cache)."""
        store = self.run.store
        todo = [i for i in idx if (key, i) not in self.cache]
        if store is not None:
            for i in [i for i in todo if store.has(self._cell(key, i))]:
                self.cache[(key, i)] = store.get(self._cell(key, i))
            todo = [i for i in todo if (key, i) not in self.cache]
        return todo

    def scores(self, key: Any, idx: Sequence[int], steers: Sequence[Steer] = ()) -> list[list[float]]:
        """Per-choice scores of questions ``idx`` with ``steers`` applied, scoring only what is missing."""
        cfg, store = self.run.cfg, self.run.store
        todo = self._todo(key, idx)
        chunks = [todo[k : k + self.CHUNK] for k in range(0, len(todo), self.CHUNK)]
        with steered(self.model, steers, cfg.unit):
            for chunk in tqdm(chunks, desc=self.run.progress(f"MC1 {key} ({len(todo)} questions)"),
                              disable=not cfg.progress or not chunks):
                res = score_mc1(
                    self.model, [self.prompts[i] for i in chunk], [self.questions[i].choices for i in chunk],
                    [self.questions[i].correct for i in chunk], separator=[self.seps[i] for i in chunk],
                    reduction=cfg.reduction, batch_size=cfg.batch_size,  # type: ignore[arg-type]
                )
                for i, s in zip(chunk, res.scores):
                    self.cache[(key, i)] = s
                    if store is not None:
                        store.put(self._cell(key, i), s)
        return [self.cache[(key, i)] for i in idx]

    def result(self, key: Any, idx: Sequence[int], steers: Sequence[Steer] = ()) -> MC1Result:
        return mc1_from_scores(self.scores(key, idx, steers), [self.questions[i].correct for i in idx])


@dataclass
class HonestyOutcome:
    """The honesty section for the JSON, and what the multi-concept table reuses."""

    result: dict[str, Any]
    chosen: dict[str, list[Steer]]
    """Per steered condition, the chosen (vector, alpha, layers) of every fold."""
    mc: MCScores
    splits: list[Split]


def _mc1_row(res: MC1Result) -> dict[str, Any]:
    return {"mc1": res.accuracy, "mc1_ci95": list(wilson_interval(res.n_correct, res.n)), "n": res.n,
            "n_correct": res.n_correct, "n_ties": res.n_ties}


def _score_key(cond: str, fold: int, layers: tuple[int, ...], alpha: float) -> Any:
    """The cache/cell key of a grid point: alpha 0 is the unsteered model, shared with "base"."""
    return "base" if alpha == 0 else (cond, fold, layers, alpha)


def load_questions(cfg: Config) -> tuple[list[MCQuestion], list[str] | None]:
    """TruthfulQA's questions (the first ``n_questions``) and, for honesty-fact, the true statements."""
    tqa = data_path(cfg, cfg.truthfulqa, "truthfulqa")
    questions = load_truthfulqa(None if tqa in (None, "hub") else tqa)
    if cfg.n_questions is not None:
        questions = questions[: cfg.n_questions]
    if cfg.honesty_concept != "facts":
        return questions, None
    path = data_path(cfg, cfg.facts, "facts")
    if path is None:
        raise DataUnavailableError("honesty_concept='facts' needs --facts or --data-dir with facts/")
    return questions, [s for s, true in load_facts(path) if true]


def _fold_vectors(run: AlignmentRun, questions: list[MCQuestion], split: Split, facts: list[str] | None,
                  rng: random.Random) -> tuple[dict[str, ConceptVector], list[int] | None]:
    """The fold's honesty vectors, refined on questions outside the fold's validation and test
    questions (or on fact statements), so neither the alpha search nor MC1 sees a refinement
    question; and the indices of the questions used (None for facts)."""
    cfg = run.cfg
    build: Callable[..., list[str]]
    used: list[int] | None = None
    if facts is not None:
        concept = rng.sample(facts, min(cfg.n_concept, len(facts)))
        build = honesty_fact_prompts
    else:
        held = set(split.test) | set(split.validation)
        pool = [i for i in range(len(questions)) if i not in held]
        if not pool:
            raise InvalidArgumentError("n_val", cfg.n_val, f"fewer validation questions, so some of the "
                                       f"{len(questions)} are left to refine the honesty vector")
        used = sorted(rng.sample(pool, min(cfg.n_concept, len(pool))))
        concept = [questions[i].question for i in used]
        build = honesty_prompts
    return concept_vectors(run, lambda m: (build(concept, m.tokenizer, honest=True),
                                           build(concept, m.tokenizer, honest=False))), used


def _fit_fold(run: AlignmentRun, mc: MCScores, split: Split, cond: str,
              vec: ConceptVector) -> tuple[Steer, dict[str, Any], list[list[float]]]:
    """Choose (layers, alpha) of one condition on the fold's validation questions, within the
    fluency bound, then score its test questions: the chosen steer, the fold's record and the test scores."""
    def validation_mc1(point: tuple[tuple[int, ...], float]) -> float:
        layers, alpha = point
        return mc.result(_score_key(cond, split.fold, layers, alpha), split.validation, [(vec, alpha, layers)]).accuracy

    with run.timed(f"mc1_search_{cond}"):
        steer, record = choose_under_bound(run, vec, validation_mc1, key=(cond, split.fold))
    _, alpha, layers = steer
    with run.timed(f"mc1_test_{cond}"):
        test = mc.scores(_score_key(cond, split.fold, layers, alpha), split.test, [steer])
    return steer, record, test


def _steered_rows(run: AlignmentRun, mc: MCScores, splits: list[Split], facts: list[str] | None,
                  test_all: list[int], rows: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[Steer]]]:
    """ConTrans and Self-Align: per fold, refine, choose on validation, score test; then the rows."""
    cfg, questions = run.cfg, mc.questions
    rng = random.Random(cfg.seed + 1)
    folds_out: list[dict[str, Any]] = []
    chosen: dict[str, list[Steer]] = {"transplant": [], "self-align": []}
    test_scores: dict[str, dict[int, list[float]]] = {"transplant": {}, "self-align": {}}
    for split in splits:
        vectors, used = _fold_vectors(run, questions, split, facts, rng)
        fold_rec: dict[str, Any] = {"fold": split.fold, "n_validation": len(split.validation), "n_test": len(split.test),
                                    "validation_questions": list(split.validation), "refinement_questions": used}
        for cond, vec in vectors.items():
            steer, fold_rec[cond], test = _fit_fold(run, mc, split, cond, vec)
            test_scores[cond].update(zip(split.test, test))
            chosen[cond].append(steer)
        folds_out.append(fold_rec)
    for cond in ("transplant", "self-align"):
        if cond in cfg.conditions:
            res = mc1_from_scores([test_scores[cond][i] for i in test_all], [questions[i].correct for i in test_all])
            rows[cond] = {**_mc1_row(res), "alpha": [s[1] for s in chosen[cond]],
                          "layers": [list(s[2]) for s in chosen[cond]]}
    return folds_out, chosen


def _unsteered_rows(run: AlignmentRun, questions: list[MCQuestion], test_all: list[int], rows: dict[str, Any]) -> None:
    """Inst-Align (the honest persona before every question) and Align-Training (the instruct model)."""
    cfg = run.cfg
    if "inst-align" in cfg.conditions:
        with run.timed("mc1_inst_align"):
            inst = MCScores(run, run.target, questions, instruction=HONEST_PERSONA, tag="target-instructed")
            rows["inst-align"] = {**_mc1_row(inst.result("inst", test_all)), "instruction": HONEST_PERSONA}
    if "align-training" in cfg.conditions and run.instruct is not None:
        with run.timed("mc1_align_training"):
            own = MCScores(run, run.instruct, questions, chat="auto", tag="instruct-model")
            rows["align-training"] = {**_mc1_row(own.result("own", test_all)), "model": cfg.instruct_model}


def honesty(run: AlignmentRun) -> HonestyOutcome:
    """Every configured row of the honesty table, with the folds' chosen alphas and perplexity."""
    cfg = run.cfg
    questions, facts = load_questions(cfg)
    splits = selection_splits(len(questions), n_val=cfg.n_val, folds=cfg.folds, seed=cfg.seed)
    test_all = sorted(i for s in splits for i in s.test)
    everything = sorted(set(test_all) | {i for s in splits for i in s.validation})
    mc = MCScores(run, run.target, questions, tag="target")
    rows: dict[str, Any] = {}
    run.log(f"honesty: {len(questions)} questions, {len(splits)} fold(s), test {len(test_all)}")
    base = None
    if "base" in cfg.conditions or {"transplant", "self-align"} & set(cfg.conditions):
        with run.timed("mc1_base"):  # every scored question: the test rows and the grid's alpha 0
            base = mc.result("base", everything)
    if "base" in cfg.conditions:
        rows["base"] = _mc1_row(mc.result("base", test_all))
    folds_out, chosen = _steered_rows(run, mc, splits, facts, test_all, rows)
    _unsteered_rows(run, questions, test_all, rows)
    perplexity_rows(run, rows, {c: chosen[c] for c in chosen if c in rows}, HONEST_PERSONA)
    result = {
        "concept": "honesty" if facts is None else "honesty-fact",
        "n_questions": len(questions),
        "n_test": len(test_all),
        "test_indices": test_all if len(test_all) != len(questions) else "all",
        "base_mc1_all_scored_questions": None if base is None else base.accuracy,
        "selection": f"highest validation MC1 with KL on generic text <= {cfg.kl_bound} nats/token",
        "fluency": run.fluency_record(),
        "folds": folds_out,
        "rows": rows,
    }
    return HonestyOutcome(result, chosen, mc, splits)
