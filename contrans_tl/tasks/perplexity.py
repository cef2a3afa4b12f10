"""Perplexity of neutral text (fluency under an intervention).

Texts are scored by :mod:`contrans_tl.tasks.scoring`, so a
:func:`~contrans_tl.transplant.transplant` context open around the call steers them. The
neutral text of the paper is WikiSplit; its reader lives in core (:mod:`contrans_tl.datasets`,
so map corpora can use it too) and is re-exported here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

from contrans_tl.capture import encode
from contrans_tl.datasets import detokenize_wikisplit, load_wikisplit
from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks import scoring

__all__ = ["PerplexityResult", "perplexity", "perplexity_interval", "detokenize_wikisplit", "load_wikisplit"]


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean negative log-likelihood per token) over all texts' tokens together."""

    perplexity: float
    nll_per_token: float
    n_tokens: int
    n_texts: int
    text_nll: tuple[float, ...] = field(default=(), repr=False)
    """Each text's summed negative log-likelihood (what :func:`perplexity_interval` resamples)."""
    text_tokens: tuple[int, ...] = field(default=(), repr=False)
    """Each text's number of scored tokens."""


def perplexity(
    model: ModelHandle,
    texts: Sequence[str],
    *,
    prefix: str | None = None,
    batch_size: int = 8,
    progress: str | None = None,
) -> PerplexityResult:
    """Token-level perplexity of ``texts`` (after ``prefix`` when given, e.g. an instruction).

    Without a prefix every token after the first is scored (the first after BOS when the model
    prepends one), so the number is comparable across steering conditions of one model.
    """
    if not texts:
        raise EmptyPromptsError("no texts for perplexity")
    if prefix:
        rows = scoring.continuation_rows(model, [prefix] * len(texts), [" " + t for t in texts])
    else:
        ids, _ = encode(model, texts)
        rows = [scoring.ScoredRow(tuple(r), len(r) - 1) for r in ids if len(r) > 1]
        if not rows:
            raise InvalidArgumentError("texts", texts, "at least one text of two or more tokens")
    sums = scoring.score_rows(model, rows, batch_size=batch_size, progress=progress)
    n_tokens = sum(r.n_scored for r in rows)
    nll = -float(sums.sum()) / n_tokens
    return PerplexityResult(math.exp(nll), nll, n_tokens, len(rows),
                            tuple(-float(x) for x in sums), tuple(r.n_scored for r in rows))


def perplexity_interval(
    results: Sequence[PerplexityResult], *, n_boot: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Bootstrap interval of the mean perplexity of ``results`` (e.g. one per fold), over texts.

    All results must score the same texts: one resample of text indices is applied to every
    result (a paired bootstrap), each result's perplexity is recomputed as exp(sum nll / sum
    tokens) over the resample, and the percentile interval of their mean is returned.
    """
    if not results:
        raise InvalidArgumentError("results", results, "at least one PerplexityResult")
    n = len(results[0].text_nll)
    if n == 0 or any(len(r.text_nll) != n or r.text_tokens != results[0].text_tokens for r in results):
        raise InvalidArgumentError("results", [r.n_texts for r in results],
                                   "perplexities of the same texts, with per-text scores (from perplexity())")
    rng = random.Random(seed)
    means = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        tokens = sum(results[0].text_tokens[i] for i in idx)
        means.append(sum(math.exp(sum(r.text_nll[i] for i in idx) / tokens) for r in results) / len(results))
    means.sort()
    tail = (1 - level) / 2
    return means[int(tail * (n_boot - 1))], means[int(round((1 - tail) * (n_boot - 1)))]
