"""Perplexity of neutral text (fluency under an intervention) and the WikiSplit loader.

Texts are scored by :mod:`contrans_tl.tasks.scoring`, so a
:func:`~contrans_tl.transplant.transplant` context open around the call steers them. The
neutral text of the paper is WikiSplit: the TSV's first column (a complex sentence), detokenized.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from contrans_tl.capture import encode
from contrans_tl.errors import DataFormatError, DataUnavailableError, EmptyPromptsError, InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.tasks import scoring

__all__ = ["PerplexityResult", "perplexity", "detokenize_wikisplit", "load_wikisplit"]


@dataclass(frozen=True)
class PerplexityResult:
    """exp(mean negative log-likelihood per token) over all texts' tokens together."""

    perplexity: float
    nll_per_token: float
    n_tokens: int
    n_texts: int


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
    return PerplexityResult(math.exp(nll), nll, n_tokens, len(rows))


# ---- WikiSplit ------------------------------------------------------------------------------------
_DETOK = [
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"'' ?(.*?) ?''"), r'"\1"'),
    (re.compile(r" - "), "-"),
    (re.compile(r"\s+"), " "),
]


def detokenize_wikisplit(text: str) -> str:
    """Undo WikiSplit's space-separated punctuation ("word , word ." → "word, word.")."""
    text = text.strip()
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()


def load_wikisplit(path: str | Path, *, n: int | None = None, min_words: int = 8) -> list[str]:
    """Neutral sentences: the complex-sentence column of a WikiSplit TSV, detokenized.

    ``path`` is the TSV or a directory holding ``validation.tsv`` / ``test.tsv`` / ``train.tsv``.
    Sentences shorter than ``min_words`` and duplicates are dropped; ``n`` keeps the first N.
    """
    path = Path(path)
    if path.is_dir():
        for name in ("validation.tsv", "test.tsv", "tune.tsv", "train.tsv"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise DataUnavailableError(f"no WikiSplit TSV at {path}")
    out: list[str] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line in f:
            sentence = detokenize_wikisplit(line.split("\t", 1)[0])
            if len(sentence.split()) < min_words or sentence in seen:
                continue
            seen.add(sentence)
            out.append(sentence)
            if n is not None and len(out) >= n:
                break
    if not out:
        raise DataFormatError(f"{path} holds no sentences of {min_words} or more words")
    return out
