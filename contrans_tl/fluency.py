"""Fluency under steering, as the field reports it: KL(unsteered ‖ steered) and ΔCE per token.

ITI and its successors report, next to every steering strength, how far the steered model's
next-token distribution moves from the unsteered one on ordinary text. This module is the one
place that measures it: every token of held-out generic text (the built-in
:func:`~contrans_tl.datasets.generic_texts` by default) is scored by the unsteered model and
under each :class:`~contrans_tl.transplant.Steering`, over the whole vocabulary:

* ``kl``  — mean over scored positions of KL(p_unsteered ‖ p_steered), nats/token;
* ``dce`` — mean change in cross-entropy of the text's own next tokens (steered − unsteered),
  nats/token; ``ppl_ratio = exp(dce)`` is the perplexity ratio;

each with a bootstrap 95 % interval over texts. The unsteered pass runs once per chunk of
text for all settings of a call, so a grid of strengths costs one steered pass each. A setting
that makes the model non-finite is reported as broken (infinite KL), not as an error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Hashable, Mapping, Sequence, TypeVar

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from contrans_tl import ledger, validate
from contrans_tl.capture import encode, model_device, pad_batch, pad_token_id
from contrans_tl.errors import InvalidArgumentError, NonFiniteError
from contrans_tl.handle import ModelHandle
from contrans_tl.transplant import Steering, steer

__all__ = ["Fluency", "measure_fluency", "bootstrap_ratio"]

K = TypeVar("K", bound=Hashable)

N_BOOT = 2000
"""Bootstrap resamples of the texts for every interval."""


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], *, n_boot: int = N_BOOT,
                    seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``sum(num) / sum(den)`` over resamples of the items (texts), with replacement."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    if len(num) == 0 or len(num) != len(den):
        raise InvalidArgumentError("numerators", len(num), f"one value per item, as many as denominators ({len(den)})")
    if not np.isfinite(num).all():
        return (math.inf, math.inf)
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    ratios = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-300)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return (float(low), float(high))


@dataclass(frozen=True)
class Fluency:
    """What one steering costs on generic text: per-token KL and ΔCE with intervals, and per-text sums."""

    kl: float
    """Mean KL(unsteered ‖ steered) per scored token, nats (inf: the steered model broke down)."""
    kl_ci95: tuple[float, float]
    dce: float
    """Mean change of cross-entropy on the text's own tokens (steered − unsteered), nats/token."""
    dce_ci95: tuple[float, float]
    base_nll: float
    """The unsteered model's cross-entropy on these texts, nats/token (NaN when no setting was steered: no pass ran)."""
    n_tokens: int
    n_texts: int
    text_kl: tuple[float, ...] = field(default=(), repr=False)
    """Summed KL of each text (what the intervals resample; pairs two settings text by text)."""
    text_dce: tuple[float, ...] = field(default=(), repr=False)
    text_tokens: tuple[int, ...] = field(default=(), repr=False)
    broken: bool = False
    """True when the steered model produced non-finite activations or logits."""

    @property
    def ppl_ratio(self) -> float:
        """Perplexity of the steered model over the unsteered one's: exp(ΔCE)."""
        return math.exp(self.dce) if math.isfinite(self.dce) and self.dce < 700 else math.inf

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON (infinite values as None), read back by :meth:`from_dict`."""
        def num(x: float) -> float | None:
            return float(x) if math.isfinite(x) else None

        return {"kl": num(self.kl), "kl_ci95": [num(x) for x in self.kl_ci95], "dce": num(self.dce),
                "dce_ci95": [num(x) for x in self.dce_ci95], "ppl_ratio": num(self.ppl_ratio),
                "base_nll": num(self.base_nll), "n_tokens": self.n_tokens, "n_texts": self.n_texts,
                "text_kl": [num(x) for x in self.text_kl], "text_dce": [num(x) for x in self.text_dce],
                "text_tokens": list(self.text_tokens), "broken": self.broken}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Fluency":
        def num(x: float | None) -> float:
            return math.inf if x is None else float(x)

        return cls(num(data["kl"]), (num(data["kl_ci95"][0]), num(data["kl_ci95"][1])), num(data["dce"]),
                   (num(data["dce_ci95"][0]), num(data["dce_ci95"][1])),
                   math.nan if data["base_nll"] is None else float(data["base_nll"]),
                   int(data["n_tokens"]), int(data["n_texts"]), tuple(num(x) for x in data["text_kl"]),
                   tuple(num(x) for x in data["text_dce"]), tuple(int(x) for x in data["text_tokens"]),
                   bool(data["broken"]))


@dataclass
class _Sums:
    """Per-text running sums of one setting."""

    kl: list[float]
    dce: list[float]
    broken: bool = False


def _chunks(lengths: Sequence[int], max_positions: int) -> list[list[int]]:
    """Consecutive text indices in chunks of at most ``max_positions`` tokens (at least one text each)."""
    out: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_positions:
            out.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        out.append(current)
    return out


def _windows(ids: Sequence[Sequence[int]], width: int) -> tuple[list[list[int]], list[int]]:
    """Each text's tokens in windows of at most ``width`` (consecutive windows share one token, so every token
    after a text's first is scored exactly once), and the text each window belongs to."""
    rows: list[list[int]] = []
    owner: list[int] = []
    for i, row in enumerate(ids):
        start = 0
        while start < len(row) - 1:
            rows.append(list(row[start : start + width]))
            owner.append(i)
            start += width - 1
    return rows, owner


def _logits(model: ModelHandle, ids: Int[Tensor, "b pos"], mask: Int[Tensor, "b pos"]) -> Float[Tensor, "b pos d_vocab"]:
    """Logits of every position (float32), under any active steering (noted in the forward ledger);
    raises NonFiniteError when they are not finite."""
    ledger.note(model, [row[m.bool()].tolist() for row, m in zip(ids, mask)], kind="sequence")
    device = model_device(model)
    logits = model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=0).float().cpu()
    if not bool(torch.isfinite(torch.stack(torch.aminmax(logits))).all()):
        raise NonFiniteError("non-finite logits")
    return logits


def _kl_rows(log_p: Float[Tensor, "b pos d_vocab"], log_q: Float[Tensor, "b pos d_vocab"], *,
             block: int = 16) -> Float[Tensor, "b pos"]:
    """KL(p ‖ q) at every position, summed over the vocabulary a few positions at a time (float64 result), so the
    only vocabulary-wide arrays alive are the two log-probability arrays themselves."""
    out = torch.empty(log_p.shape[:2], dtype=torch.float64)
    for start in range(0, log_p.shape[1], block):
        lp, lq = log_p[:, start : start + block], log_q[:, start : start + block]
        out[:, start : start + block] = (lp.exp() * (lp - lq)).double().sum(-1)
    return out


def _positions(mask: Int[Tensor, "b pos"]) -> Tensor:
    """Which positions predict a real next token (left padding: a real token whose successor is real)."""
    real = mask.bool()
    scored = torch.zeros_like(real)
    scored[:, :-1] = real[:, :-1] & real[:, 1:]
    return scored


@torch.inference_mode()
def measure_fluency(
    model: ModelHandle,
    texts: Sequence[str],
    settings: Mapping[K, Steering | Sequence[Steering] | None],
    *,
    max_positions: int = 160,
    n_boot: int = N_BOOT,
    seed: int = 0,
    check_model: bool = True,
    progress: str | None = None,
) -> dict[K, Fluency]:
    """KL(unsteered ‖ steered) and ΔCE per token of ``texts`` for every steering in ``settings``.

    Every token after a text's first is scored over the whole vocabulary (``kl`` and ``dce`` are
    means over all scored tokens of all texts; a text longer than ``max_positions`` or the model's
    context runs in consecutive windows). Windows run in chunks of at most ``max_positions``
    tokens: each chunk's unsteered log-probabilities are computed once and compared with every
    setting's, so memory holds three vocabulary-wide arrays of one chunk. A ``None`` or all-zero
    setting is the unsteered model (KL 0). Intervals: bootstrap over texts (``n_boot``, ``seed``).
    """
    texts = validate.texts("texts", texts, what="texts")
    validate.integer("max_positions", max_positions, low=2)
    if not settings:
        raise InvalidArgumentError("settings", dict(settings), "at least one steering setting (None: unsteered)")
    parts: dict[K, list[Steering]] = {}
    for key, setting in settings.items():
        items = [] if setting is None else [setting] if isinstance(setting, Steering) else list(setting)
        if not all(isinstance(x, Steering) for x in items):
            raise InvalidArgumentError(f"settings[{key!r}]", setting, "a Steering (contrans_tl.Steering), a sequence of "
                                       "them, or None")
        parts[key] = [x for x in items if not x.is_null]
    whole, _ = encode(model, texts, allow_long=True)
    short = [i for i, row in enumerate(whole) if len(row) < 2]
    if short:
        raise InvalidArgumentError("texts", [texts[i] for i in short[:3]], "texts of two or more tokens each")
    ids, owner = _windows(whole, min(int(model.cfg.n_ctx), max_positions))
    steered = {k: p for k, p in parts.items() if p}
    sums = {k: _Sums([0.0] * len(texts), [0.0] * len(texts)) for k in steered}
    base_nll = [0.0] * len(texts)
    tokens = [0] * len(texts)
    for row, i in zip(ids, owner):
        tokens[i] += len(row) - 1
    pad = pad_token_id(model)
    chunks = _chunks([len(row) for row in ids], max_positions) if steered else []  # nothing steered: no pass at all
    bar = tqdm(total=len(chunks) * (1 + len(steered)), desc=progress, disable=progress is None, leave=False)
    for chunk in chunks:
        batch = pad_batch([ids[i] for i in chunk], pad_id=pad, padding_side="left")
        scored = _positions(batch.attention_mask)
        targets = torch.zeros_like(batch.input_ids)
        targets[:, :-1] = batch.input_ids[:, 1:]
        log_p = _logits(model, batch.input_ids, batch.attention_mask)
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))  # in place: one vocabulary-wide array per chunk
        nll_p = -log_p.gather(-1, targets[..., None])[..., 0].double()
        for row, w in enumerate(chunk):
            base_nll[owner[w]] += float((nll_p[row] * scored[row]).sum())
        bar.update()
        for key, setting in steered.items():
            acc = sums[key]
            if acc.broken:
                bar.update()
                continue
            try:
                with steer(model, setting, check_model=check_model):
                    z = _logits(model, batch.input_ids, batch.attention_mask)
            except NonFiniteError:
                acc.broken = True
                bar.update()
                continue
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            nll_q = (lse[..., 0] - z.gather(-1, targets[..., None])[..., 0]).double()
            z.sub_(lse)  # log q, in place
            kl = _kl_rows(log_p, z).clamp_min(0)
            del z
            for row, w in enumerate(chunk):
                acc.kl[owner[w]] += float((kl[row] * scored[row]).sum())
                acc.dce[owner[w]] += float(((nll_q[row] - nll_p[row]) * scored[row]).sum())
            bar.update()
        del log_p
    bar.close()
    n_tokens = sum(tokens)
    base = sum(base_nll) / n_tokens if steered else math.nan  # not measured when nothing was steered
    out: dict[K, Fluency] = {}
    for key, setting in settings.items():
        if key not in steered:
            zeros = tuple(0.0 for _ in texts)
            out[key] = Fluency(0.0, (0.0, 0.0), 0.0, (0.0, 0.0), base, n_tokens, len(texts), zeros, zeros, tuple(tokens))
            continue
        acc = sums[key]
        if acc.broken:
            infs = tuple(math.inf for _ in texts)
            out[key] = Fluency(math.inf, (math.inf, math.inf), math.inf, (math.inf, math.inf), base, n_tokens,
                               len(texts), infs, infs, tuple(tokens), broken=True)
            continue
        out[key] = Fluency(
            kl=sum(acc.kl) / n_tokens, kl_ci95=bootstrap_ratio(acc.kl, tokens, n_boot=n_boot, seed=seed),
            dce=sum(acc.dce) / n_tokens, dce_ci95=bootstrap_ratio(acc.dce, tokens, n_boot=n_boot, seed=seed),
            base_nll=base, n_tokens=n_tokens, n_texts=len(texts), text_kl=tuple(acc.kl), text_dce=tuple(acc.dce),
            text_tokens=tuple(tokens),
        )
    return out
