"""Log-probability of continuations: the one scorer behind every choice task and perplexity.

:func:`choice_logprobs` scores items with choices (the concept task: emotions, TruthfulQA MC1,
any concept file): each choice by the sum of its tokens' log-probabilities after the prompt,
plus the vocabulary-wide top next token (Token Acc). :func:`score_rows` scores given rows.

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

from contrans_tl import ledger, validate
from contrans_tl.capture import Prefix, encode, forward_rows, model_device, pad_batch, pad_token_id, prompt_ids, run_prefix
from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError, NonFiniteError
from contrans_tl.handle import ModelHandle

__all__ = ["Reduction", "ScoredRow", "continuation_rows", "score_rows", "reduce_scores", "continuation_logprobs",
           "ChoiceLogprobs", "choice_logprobs"]

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
    """Rows scoring ``continuations[i]`` after ``prompts[i]`` (the prompt with the BOS policy, then the
    continuation's tokens as :func:`choice_tokens` splits them)."""
    if len(prompts) != len(continuations):
        raise InvalidArgumentError("continuations", f"{len(continuations)} texts", f"one per prompt ({len(prompts)})")
    if not prompts:
        raise EmptyPromptsError("no continuations to score")
    unique = sorted(set(prompts))
    prompt_ids = dict(zip(unique, encode(model, unique)[0]))
    return [ScoredRow(tuple(prompt_ids[p]) + (tail := choice_tokens(model.tokenizer, p, c)), len(tail))
            for p, c in zip(prompts, continuations)]


def _batches(sizes: Sequence[tuple[int, int]], batch_size: int, max_logits: int, vocab: int) -> list[list[int]]:
    """Row indices in batches sorted by (kept positions, length) of ``sizes``; a batch is cut short
    when its kept logits (rows × kept positions × vocabulary) would pass ``max_logits``."""
    order = sorted(range(len(sizes)), key=lambda i: sizes[i])
    batches: list[list[int]] = []
    start = 0
    while start < len(order):
        longest = sizes[order[min(start + batch_size, len(order)) - 1]][0]
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
    sizes = [(r.n_scored + 1, len(r.ids)) for r in rows]
    for idx in tqdm(_batches(sizes, batch_size, max_logits, vocab), desc=progress, disable=progress is None, leave=False):
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


# ---- items with choices ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceLogprobs:
    """Per item: each choice's summed token log-probability after the prompt, and the model's top next token."""

    logprobs: tuple[tuple[float, ...], ...]
    """log p(choice | prompt), summed over the choice's tokens (float64)."""
    first_tokens: tuple[tuple[int, ...], ...]
    """The first token of each choice (Token Acc compares it with :attr:`top`)."""
    n_tokens: tuple[tuple[int, ...], ...]
    """Tokens per choice."""
    top: tuple[int, ...]
    """Argmax over the whole vocabulary of the token after each prompt."""


def choice_tokens(tokenizer: object, prompt: str, choice: str) -> tuple[int, ...]:
    """The tokens of ``choice`` as they follow ``prompt``: the tail of ``prompt + choice`` when the
    prompt's own tokens are its prefix (the usual case), else ``choice`` tokenized alone."""
    head = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    full = list(tokenizer(prompt + choice, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    if len(full) > len(head) and full[: len(head)] == head:
        return tuple(full[len(head):])
    tail = tuple(tokenizer(choice, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
    if not tail:
        raise EmptyPromptsError(f"choice {choice!r} tokenizes to no tokens")
    return tail


@dataclass(frozen=True)
class _Reads:
    """One row and what to read at its last ``len(tokens)`` positions: the log-probs of those tokens."""

    ids: tuple[int, ...]
    tokens: tuple[tuple[int, ...], ...]
    """Per read position (in order, ending at the row's last position), the token ids wanted there."""


def _item_rows(context: list[int], choices: list[tuple[int, ...]]) -> list[_Reads]:
    """The rows that score one item: the context alone when every choice is one token, else one row per
    longer choice (context + its tokens but the last), the first of which also serves the one-token choices."""
    firsts = tuple(sorted({c[0] for c in choices}))
    longer = [c for c in choices if len(c) > 1]
    if not longer:
        return [_Reads(tuple(context), (firsts,))]
    rows = []
    for k, c in enumerate(longer):
        head = firsts if k == 0 else (c[0],)
        rows.append(_Reads(tuple(context) + c[:-1], (head,) + tuple((t,) for t in c[1:])))
    return rows


@torch.inference_mode()
def _read_rows(model: ModelHandle, rows: Sequence[_Reads], prefix: Prefix | None, batch_size: int,
               max_logits: int, progress: str | None) -> tuple[list[list[dict[int, float]]], list[int]]:
    """Log-probs of the wanted tokens at each row's read positions, and the argmax at its first read position."""
    pad_id = pad_token_id(model)
    vocab = int(getattr(model.cfg, "d_vocab", 0) or len(model.tokenizer))
    got: list[list[dict[int, float]]] = [[] for _ in rows]
    tops = [0] * len(rows)
    ledger.note(model, [r.ids for r in rows], prefix=prefix.ids if prefix is not None else (), kind="logits")
    sizes = [(len(r.tokens), len(r.ids)) for r in rows]
    for idx in tqdm(_batches(sizes, batch_size, max_logits, vocab), desc=progress, disable=progress is None, leave=False):
        keep = max(len(rows[i].tokens) for i in idx)
        batch = pad_batch([rows[i].ids for i in idx], pad_id=pad_id, padding_side="left")
        logits = forward_rows(model, batch, prefix, logits_to_keep=keep)[:, -keep:].float().cpu()
        lse = torch.logsumexp(logits, dim=-1)
        if not bool(torch.isfinite(lse).all()):  # NaN or inf anywhere in a row reaches its log-sum-exp
            raise NonFiniteError("non-finite logits: check the model's dtype and the steering strength")
        for b, i in enumerate(idx):
            start = keep - len(rows[i].tokens)
            got[i] = [{t: float(logits[b, start + j, t]) - float(lse[b, start + j]) for t in wanted}
                      for j, wanted in enumerate(rows[i].tokens)]
            tops[i] = int(logits[b, start].argmax())
        del logits
    return got, tops


@torch.inference_mode()
def choice_logprobs(
    model: ModelHandle,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    prefix: str | None = None,
    batch_size: int = 16,
    max_logits: int = 1 << 26,
    progress: str | None = None,
) -> ChoiceLogprobs:
    """Score every choice of every item after its prompt (under any active hooks).

    The model sees ``prefix`` (run once, its KV cache shared; tokenized with the BOS policy)
    then the prompt's tokens, or the prompt alone with the BOS policy when there is no prefix.
    A choice's score is the sum of its tokens' log-probabilities (:func:`choice_tokens` splits it);
    choices of one token are all read from one forward of the context, longer ones from a row each.
    ``top`` is the vocabulary argmax after the prompt (for Token Acc).
    """
    prompts = validate.texts("prompts", prompts)
    validate.integer("batch_size", batch_size, low=1)
    if len(choices) != len(prompts):
        raise InvalidArgumentError("choices", f"{len(choices)} choice lists", f"one per prompt ({len(prompts)})")
    shared = run_prefix(model, prefix) if prefix else None
    contexts = prompt_ids(model, prompts, shared)
    item_tokens: list[list[tuple[int, ...]]] = []
    rows: list[_Reads] = []
    owner: list[int] = []
    for i, (prompt, options) in enumerate(zip(prompts, choices)):
        options = validate.texts(f"choices[{i}]", options, what="choices")
        tokens = [choice_tokens(model.tokenizer, prompt, c) for c in options]
        item_tokens.append(tokens)
        for row in _item_rows(contexts[i], tokens):
            rows.append(row)
            owner.append(i)
    got, tops = _read_rows(model, rows, shared, batch_size, max_logits, progress)
    per_item: list[list[int]] = [[] for _ in prompts]  # rows of each item, in order
    for r, i in enumerate(owner):
        per_item[i].append(r)
    first_read = [rows_of[0] for rows_of in per_item]
    logprobs, top = [], []
    for i, tokens in enumerate(item_tokens):
        head = got[first_read[i]][0]
        longer_rows = iter(per_item[i])
        scores = []
        for c in tokens:
            if len(c) == 1:
                scores.append(head[c[0]])
                continue
            r = next(longer_rows)
            scores.append(sum(got[r][j][t] for j, t in enumerate(c)))
        logprobs.append(tuple(scores))
        top.append(tops[first_read[i]])
    return ChoiceLogprobs(tuple(logprobs), tuple(tuple(c[0] for c in t) for t in item_tokens),
                          tuple(tuple(len(c) for c in t) for t in item_tokens), tuple(top))
