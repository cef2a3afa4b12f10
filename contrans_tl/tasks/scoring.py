"""Log-probability of continuations: the one scorer behind TruthfulQA MC1 and perplexity.

Rows run through :mod:`contrans_tl.capture`'s tokenization and padding, so a
:func:`~contrans_tl.transplant.transplant` context open around the call steers what is scored.

Log-likelihood of a continuation: prompt and prompt+continuation are tokenized with the
library's BOS policy; when the prompt's tokens are a prefix of the full string's, the
continuation is the rest, otherwise the continuation is tokenized alone and appended. Rows are
left-padded, so every row's continuation sits at its end; the model keeps logits only for those
last positions (``logits_to_keep``) and the log-softmax runs on that slice alone, which keeps a
262k vocabulary affordable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from contrans_tl import validate
from contrans_tl.capture import encode, model_device, pad_batch, pad_token_id
from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError, NonFiniteError
from contrans_tl.handle import ModelHandle

__all__ = ["Reduction", "ScoredRow", "continuation_rows", "score_rows", "reduce_scores", "continuation_logprobs"]

Reduction = Literal["sum", "mean"]
"""How a continuation's token log-probs combine: "sum" (MC1 as in the paper) or "mean"."""


@dataclass(frozen=True)
class ScoredRow:
    """Token ids of one sequence whose last ``n_scored`` tokens are scored."""

    ids: tuple[int, ...]
    n_scored: int

    def __post_init__(self) -> None:
        if not 1 <= self.n_scored < len(self.ids):
            raise InvalidArgumentError(
                "n_scored", self.n_scored,
                f"1 to {len(self.ids) - 1}: a row of {len(self.ids)} tokens needs one context token and one scored token",
            )


def continuation_rows(model: ModelHandle, prompts: Sequence[str], continuations: Sequence[str]) -> list[ScoredRow]:
    """Rows scoring ``continuations[i]`` after ``prompts[i]`` (strings joined as given)."""
    if len(prompts) != len(continuations):
        raise InvalidArgumentError("continuations", f"{len(continuations)} texts", f"one per prompt ({len(prompts)})")
    if not prompts:
        raise EmptyPromptsError("no continuations to score")
    unique = sorted(set(prompts))
    prompt_ids = dict(zip(unique, encode(model, unique)[0]))
    full_ids, _ = encode(model, [p + c for p, c in zip(prompts, continuations)])
    rows = []
    for i, (p, c) in enumerate(zip(prompts, continuations)):
        head, full = prompt_ids[p], full_ids[i]
        if len(full) > len(head) and full[: len(head)] == head:
            rows.append(ScoredRow(tuple(full), len(full) - len(head)))
            continue
        tail = list(model.tokenizer(c, add_special_tokens=False)["input_ids"])
        if not tail:
            raise EmptyPromptsError(f"continuation {i} tokenizes to no tokens: {c!r}")
        rows.append(ScoredRow(tuple(head) + tuple(tail), len(tail)))
    return rows


def _batches(rows: Sequence[ScoredRow], batch_size: int, max_logits: int, vocab: int) -> list[list[int]]:
    """Row indices in batches sorted by scored length, then total length; a batch is cut short
    when its kept logits (rows × positions × vocabulary) would pass ``max_logits``."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i].n_scored, len(rows[i].ids)))
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = rows[order[min(start + batch_size, len(order)) - 1]].n_scored + 1
        size = max(1, min(batch_size, max_logits // max(1, longest * vocab)))
        batches.append(order[start : start + size])
        start += size
    return batches


def _score_batch(model: ModelHandle, rows: list[ScoredRow], pad_id: int, device: torch.device) -> Float[Tensor, " batch"]:
    """Summed log-probs of the scored tokens of one left-padded batch (float64, CPU)."""
    batch = pad_batch([r.ids for r in rows], pad_id=pad_id, padding_side="left")
    n_scored = torch.tensor([r.n_scored for r in rows])
    keep = int(n_scored.max()) + 1  # the logits that predict the last `keep - 1` tokens
    logits = model(batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device), logits_to_keep=keep)
    logits = logits[:, -keep:-1].float()  # [b, keep-1, vocab]
    targets = batch.input_ids[:, -(keep - 1) :].to(logits.device)
    picked = logits.gather(-1, targets[..., None])[..., 0]
    token_lp = (picked - torch.logsumexp(logits, dim=-1)).double().cpu()
    del logits
    scored = torch.arange(keep - 1)[None, :] >= (keep - 1 - n_scored)[:, None]
    return (token_lp * scored).sum(-1)


@torch.inference_mode()
def score_rows(
    model: ModelHandle,
    rows: Sequence[ScoredRow],
    *,
    batch_size: int = 8,
    max_logits: int = 1 << 27,
    progress: str | None = None,
) -> Float[Tensor, " row"]:
    """Sum of log-probs of each row's scored tokens (float64, CPU), under any active hooks.

    Rows are batched by scored length, then total length, so the kept logit slice and the
    padding stay small; a batch is cut further when ``rows × kept positions × vocabulary``
    would pass ``max_logits`` (128M floats = 512 MB), e.g. for perplexity of long texts.
    """
    validate.integer("batch_size", batch_size, low=1)
    out = torch.empty(len(rows), dtype=torch.float64)
    if not rows:
        return out
    pad_id, device = pad_token_id(model), model_device(model)
    vocab = int(getattr(model.cfg, "d_vocab", 0) or len(model.tokenizer))
    for idx in tqdm(_batches(rows, batch_size, max_logits, vocab), desc=progress, disable=progress is None, leave=False):
        sums = _score_batch(model, [rows[i] for i in idx], pad_id, device)
        if not torch.isfinite(sums).all():
            raise NonFiniteError("non-finite log-likelihood: check the model's dtype and the steering strength")
        out[idx] = sums
    return out


def reduce_scores(sums: Float[Tensor, " row"], rows: Sequence[ScoredRow], reduction: Reduction) -> Float[Tensor, " row"]:
    """Summed log-probs as they are ("sum") or per scored token ("mean")."""
    if validate.choice("reduction", reduction, ("sum", "mean")) == "sum":
        return sums
    return sums / torch.tensor([r.n_scored for r in rows], dtype=torch.float64)


def continuation_logprobs(
    model: ModelHandle,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    reduction: Reduction = "sum",
    batch_size: int = 8,
    progress: str | None = None,
) -> Float[Tensor, " pair"]:
    """log p(continuation | prompt) per pair: summed over its tokens, or their mean."""
    rows = continuation_rows(model, prompts, continuations)
    sums = score_rows(model, rows, batch_size=batch_size, progress=progress)
    return reduce_scores(sums, rows, reduction)
