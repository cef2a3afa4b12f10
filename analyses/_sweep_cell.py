"""One (checkpoint, alpha) cell of the checkpoint sweep, run in a worker (:mod:`analyses.checkpoint_sweep`).

A cell loads its checkpoint (or reuses the one its process loaded for the previous cell), carries the final
model's saved vectors into it (as they are, or through a map fitted final → checkpoint) and scores the
emotion task at its alpha. Everything it needs is in :class:`CellArgs` or on disk, so any executor can run it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

import contrans_tl as ct
from contrans_tl.analyses import _common as cm
from contrans_tl.analyses._checkpoints import resolve_checkpoint, training_tokens
from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import capture
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.pairing import PairedStates, Scheme
from contrans_tl.tasks.emotion import EmotionTask, emotion_task
from contrans_tl.transplant import Unit

__all__ = ["CellArgs", "run_cell", "clear_slot"]


@dataclass(frozen=True)
class CellArgs:
    """Everything one (checkpoint, alpha) cell needs; picklable for any executor."""

    model: str
    checkpoint: str
    alpha: float
    vectors_dir: str
    final_states: str | None
    emotions: tuple[str, ...]
    n_refine: int | None
    n_eval: int | None
    seed: int
    data_dir: str | None
    depth: float
    unit: Unit
    mapping: str
    n_texts: int | None
    map_corpus: str
    map_estimator: str
    batch_size: int
    device: str | None
    dtype: str
    threads: int | None
    tokens_per_step: float | None


_SLOT: dict[str, Any] = {}
"""This process's last checkpoint (model, norms, mapped vectors), reused by its next cells."""


def clear_slot() -> None:
    _SLOT.clear()
    cm.free_memory()


def _carry_vectors(args: CellArgs, model: ModelHandle, layer: int, norms: Float[Tensor, "n_layers"],
                   finals: dict[str, ConceptVector], task: EmotionTask
                   ) -> tuple[str, dict[str, ConceptVector], dict[str, Any] | None, int]:
    """The final model's vectors in this checkpoint: (mapping used, vectors, the fitted map's held-out R², corpus
    and estimator or None, forward batches)."""
    first = next(iter(finals.values()))
    same_shape = (first.model.n_layers, first.d_model) == (int(model.cfg.n_layers), int(model.cfg.d_model))
    mapping = ("identity" if same_shape else "fit") if args.mapping == "auto" else args.mapping
    if mapping == "identity":
        return mapping, {e: cm.relabel(v, model, norms) for e, v in finals.items()}, None, 0
    if args.final_states is None:
        raise InvalidArgumentError("final_states", None, "the final model's aligned states when mapping is 'fit'")
    source = PairedStates.load(args.final_states)
    corpus = cm.map_corpus(args.map_corpus, neutral_sentences()[: args.n_texts], task)
    texts = list(corpus.texts)
    states = ct.capture_paired(model, texts, layers=[layer], scheme=cast(Scheme, source.scheme), batch_size=8)
    amap = ct.fit_map_from_states(source, states, layers=[(source.layers[0], layer)], seed=args.seed,
                                  estimator=args.map_estimator, corpus=corpus)
    vectors = {e: cm.with_norms(amap.apply(v), norms, "the checkpoint's mean resid_post norm") for e, v in finals.items()}
    fitted = {"r2_heldout": float(amap.r2_heldout[0]), "corpus": amap.provenance["corpus"]["spec"],
              "n_texts": len(texts), "estimator": amap.provenance["estimator"]}
    return mapping, vectors, fitted, cm.batches(len(texts), 8)


def _prepared(args: CellArgs) -> dict[str, Any]:
    """Load the checkpoint and carry the vectors into it, once per checkpoint per process."""
    key = (args.model, args.checkpoint, args.device, args.dtype, args.vectors_dir)
    if _SLOT.get("key") == key:
        return _SLOT
    clear_slot()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    name, kwargs = resolve_checkpoint(args.model, args.checkpoint)
    model = ct.load_model(name, device=args.device, dtype=cm.DTYPES[args.dtype], **kwargs)
    load_s = time.perf_counter() - start
    task = emotion_task(args.emotions, n_refine=args.n_refine, n_eval=args.n_eval, seed=args.seed,
                        data_dir=args.data_dir)
    n_layers = int(model.cfg.n_layers)
    layer = cm.layer_at_depth(n_layers, args.depth)
    finals = {e: ConceptVector.load(Path(args.vectors_dir) / f"{e}.safetensors") for e in args.emotions}
    # alpha's unit: this checkpoint's own mean residual norm at its steering layer (as refine measures it)
    prompts = list(dict.fromkeys(p for e in args.emotions for side in task.contrast(e) for p in side))
    norms = torch.zeros(n_layers)
    norms[layer] = capture(model, prompts, layers=[layer], batch_size=args.batch_size)[:, 0].norm(dim=-1).mean()
    mapping, vectors, fitted, map_batches = _carry_vectors(args, model, layer, norms, finals, task)
    _SLOT.update(key=key, model=model, task=task, layer=layer, mapping=mapping, vectors=vectors, fitted=fitted,
                 load_s=round(load_s, 2), prep_batches=cm.batches(len(prompts), args.batch_size) + map_batches,
                 norm=float(norms[layer]))
    return _SLOT


def _evaluate_cell(args: CellArgs) -> dict[str, Any]:
    slot = _prepared(args)
    task = slot["task"]
    per: dict[str, Any] = {}
    batches = 0
    for e in args.emotions:
        per[e] = task.score(slot["model"], e, vector=slot["vectors"][e], alpha=args.alpha, layers=[slot["layer"]],
                            unit=args.unit, batch_size=args.batch_size)
        batches += 1 + cm.batches(len(task.negatives(e)), args.batch_size)
    return {
        "per_emotion": per,
        "mean_logit_acc": float(np.mean([r["logit_acc"] for r in per.values()])),
        "mean_token_acc": float(np.mean([r["token_acc"] for r in per.values()])),
        "layer": slot["layer"],
        "mapping": slot["mapping"],
        "map_r2_heldout": slot["fitted"]["r2_heldout"] if slot["fitted"] else None,
        "map": slot["fitted"],
        "resid_norm": slot["norm"],
        "forward_batches_estimated": batches,
        "checkpoint_prep_batches_estimated": slot["prep_batches"],
        "load_seconds": slot["load_s"],
    }


def run_cell(args: CellArgs) -> dict[str, Any]:
    """Score one (checkpoint, alpha) cell. Module-level, so executors can pickle it."""
    start = time.perf_counter()
    out = _evaluate_cell(args)
    out.update(
        checkpoint=args.checkpoint,
        alpha=args.alpha,
        tokens=training_tokens(args.checkpoint, tokens_per_step=args.tokens_per_step),
        seconds=round(time.perf_counter() - start, 2),
        pid=os.getpid(),
        finished=time.time(),
    )
    return out
