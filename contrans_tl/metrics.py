"""Pure metric functions on tensors: no model, no forward pass."""

from __future__ import annotations

import itertools
import math
from typing import Iterable, Sequence

import numpy as np

from contrans_tl.errors import InvalidArgumentError

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["token_accuracy", "logit_accuracy", "layer_cosine", "cosine", "wilson_interval", "accuracy_interval",
           "paired_difference_interval", "paired_permutation_p", "mcnemar_p", "holm"]


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


def paired_difference_interval(a: Sequence[bool | int], b: Sequence[bool | int], *,
                               z: float = 1.959964) -> tuple[float, float, float]:
    """Accuracy of ``b`` minus that of ``a`` on the same items (0/1 outcomes paired by position), with
    Newcombe's (1998) hybrid score interval for paired proportions, 95 % by default.

    Each accuracy's Wilson limits are combined as for independent proportions, less the covariance the
    items' agreement implies (a continuity-corrected phi coefficient of the 2×2 table): on items that
    mostly agree under both, the interval is narrower than the unpaired one, never wider when they
    agree more often than by chance.
    """
    if len(a) != len(b) or len(a) == 0:
        raise InvalidArgumentError("b", f"{len(b)} outcomes", f"as many outcomes as a ({len(a)}), at least one")
    if any(x not in (0, 1) for x in (*a, *b)):
        raise InvalidArgumentError("a, b", "non-binary outcomes", "0/1 (or bool) outcomes")
    n = len(a)
    both = sum(1 for x, y in zip(a, b) if x and y)
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    neither = n - both - only_a - only_b
    pa, pb = (both + only_a) / n, (both + only_b) / n
    (la, ua), (lb, ub) = wilson_interval(both + only_a, n, z=z), wilson_interval(both + only_b, n, z=z)
    margins = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    corrected = cross - n / 2 if cross > n / 2 else min(cross, 0)
    phi = corrected / math.sqrt(margins) if margins > 0 else 0.0
    d = pb - pa
    low = d - math.sqrt(max(0.0, (pb - lb) ** 2 - 2 * phi * (pb - lb) * (ua - pa) + (ua - pa) ** 2))
    high = d + math.sqrt(max(0.0, (ub - pb) ** 2 - 2 * phi * (ub - pb) * (pa - la) + (pa - la) ** 2))
    return d, max(-1.0, low), min(1.0, high)


def paired_permutation_p(a: Sequence[float], b: Sequence[float], *, n_perm: int = 20000, seed: int = 0) -> float:
    """Two-sided p-value that items score the same under ``a`` and ``b`` (paired by position).

    Sign-flip permutation test of the mean per-item difference: under the null each difference
    is as likely negated. Exact over all 2^k sign patterns when the k non-zero differences are
    at most 16, else ``n_perm`` random patterns (p = (hits + 1) / (n_perm + 1), never 0).
    """
    if len(a) != len(b) or len(a) == 0:
        raise InvalidArgumentError("b", f"{len(b)} items", f"as many items as a ({len(a)}), at least one: the test pairs them")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[d != 0]
    if len(d) == 0:
        return 1.0
    observed = abs(d.sum()) - 1e-12
    if len(d) <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float((np.abs(signs @ d) >= observed).mean())
    signs = np.random.default_rng(seed).choice((1.0, -1.0), size=(n_perm, len(d)))
    return float(((np.abs(signs @ d) >= observed).sum() + 1) / (n_perm + 1))


def mcnemar_p(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value of two paired 0/1 outcomes (binomial test on the discordant pairs)."""
    if len(a_correct) != len(b_correct):
        raise InvalidArgumentError("b_correct", f"{len(b_correct)} outcomes", f"as many as a_correct ({len(a_correct)})")
    only_a = sum(1 for x, y in zip(a_correct, b_correct) if x and not y)
    only_b = sum(1 for x, y in zip(a_correct, b_correct) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(0, min(only_a, only_b) + 1)) / 2**n
    return float(min(1.0, 2 * tail))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error over the given tests), in input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * float(pvalues[i])))
        adjusted[i] = running
    return adjusted
