"""Pure metric functions on tensors: no model, no forward pass."""

from __future__ import annotations

from typing import Iterable

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["token_accuracy", "logit_accuracy", "layer_cosine", "cosine", "wilson_interval", "accuracy_interval"]


def token_accuracy(logits: Float[Tensor, "batch d_vocab"], target_token: int) -> float:
    """Fraction of rows whose argmax over the whole vocabulary is ``target_token`` (Token Acc)."""
    if logits.shape[0] == 0:
        return float("nan")
    return float((logits.argmax(-1) == int(target_token)).float().mean())


def logit_accuracy(
    logits: Float[Tensor, "batch d_vocab"], label_tokens: Int[Tensor, "n_labels"], target_index: int
) -> float:
    """Fraction of rows whose argmax among the label tokens is label ``target_index`` (Logit Acc)."""
    if logits.shape[0] == 0:
        return float("nan")
    return float((logits[:, label_tokens].argmax(-1) == int(target_index)).float().mean())


def layer_cosine(a: Float[Tensor, "layer d_model"], b: Float[Tensor, "layer d_model"]) -> Float[Tensor, "layer"]:
    """Cosine similarity per layer (0 where either vector is zero)."""
    num = (a.double() * b.double()).sum(-1)
    den = a.double().norm(dim=-1) * b.double().norm(dim=-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine of ``a`` and ``b`` flattened, in float64 (0 when either is zero).

    Stacked rows give one cosine over all of them (the transfer report's combined cosine
    over the steered layers).
    """
    a, b = a.double().flatten(), b.double().flatten()
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else 0.0


def wilson_interval(successes: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): honest at 0/n and n/n, unlike ±1.96·SE."""
    if n <= 0:
        return (float("nan"), float("nan"))
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in 0..{n}, not {successes}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    return (low, 1.0 if successes == n else min(1.0, centre + half))


def accuracy_interval(scores: Iterable[tuple[float, int]]) -> tuple[float, float]:
    """Wilson interval of accuracies measured on ``n`` items each, pooled: (accuracy, n) pairs → hits = round(acc · n)."""
    pairs = [(float(acc), int(n)) for acc, n in scores]
    return wilson_interval(sum(round(acc * n) for acc, n in pairs), sum(n for _, n in pairs))
