"""Logit lens: read a residual stream through the model's own final norm and unembedding.

Two readouts share the model's final norm (:func:`apply_final_norm`): :func:`logits_from_resid`
maps residual vectors to logits, and :func:`concept_readout` gives the residual direction whose
read-out raises a concept's tokens over others (``W_U`` columns times the norm's gain,
:func:`final_norm_gain`), the direction the reports' logit-lens proxy compares vectors with.

:func:`logit_lens` captures ``resid_post`` of one block at each prompt's last token (with
:func:`~contrans_tl.capture.capture`, under an optional :func:`~contrans_tl.transplant.transplant`
context) and maps it to next-token probabilities with the bridge's ``ln_final`` and
``unembed`` modules — and the final logit soft-capping of models that have one (Gemma 2, and
Gemma 3 checkpoints whose config sets ``final_logit_softcapping``; gemma-3-270m leaves it
null). Read at the last block this reproduces :func:`~contrans_tl.capture.next_token_logits`.

The token-shift tables of the paper's appendix B.3 (Table 8) compare the read-out before and
after a transplant: per prompt the ``k`` tokens whose probability rises most and the ``k`` that
fall most (:func:`token_shift`), then over all prompts how often each token is among them
(:func:`count_tokens`), as markdown (:func:`shift_markdown`) or CSV (:func:`shift_csv`).
:func:`topk_overlap` compares the sets two vectors (native vs transplanted) move.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import capture, check_layers, model_device
from contrans_tl.errors import InvalidArgumentError
from contrans_tl.handle import ModelHandle
from contrans_tl.transplant import Unit, transplant

__all__ = [
    "apply_final_norm",
    "final_norm_gain",
    "concept_readout",
    "final_softcap",
    "logits_from_resid",
    "lens_resid",
    "logit_lens",
    "TokenShift",
    "token_shift",
    "token_label",
    "count_tokens",
    "topk_overlap",
    "shift_markdown",
    "shift_csv",
]


def final_softcap(model: ModelHandle) -> float | None:
    """The model's final logit soft-cap (``logits = cap · tanh(logits / cap)``), or None.

    Read from the HF config (``final_logit_softcapping``), else from TransformerLens's
    ``cfg.output_logits_soft_cap`` (negative or zero means none).
    """
    hf = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(hf, "final_logit_softcapping", None) if hf is not None else None
    if cap is None:
        cap = getattr(getattr(model, "cfg", None), "output_logits_soft_cap", None)
    if cap is None or float(cap) <= 0:
        return None
    return float(cap)


def apply_final_norm(model: ModelHandle, resid: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch d_model"]:
    """The model's own final norm (``ln_final``) applied to residual vectors, on its device and in its dtype."""
    h = resid.to(device=model_device(model), dtype=model.embed.W_E.dtype)
    return model.ln_final(h[:, None, :])[:, 0]


@torch.inference_mode()
def logits_from_resid(
    model: ModelHandle, resid: Float[Tensor, "batch d_model"], *, batch_size: int = 64
) -> Float[Tensor, "batch d_vocab"]:
    """Final norm → unembedding (→ soft-cap) of residual vectors; float32 on the CPU.

    This applies modules of the already-loaded model to given vectors; no forward pass.
    """
    cap = final_softcap(model)
    out = []
    for start in range(0, resid.shape[0], batch_size):
        normed = apply_final_norm(model, resid[start : start + batch_size])
        logits = model.unembed(normed[:, None, :])[:, 0]
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        out.append(logits.float().cpu())
    return torch.cat(out)


@torch.no_grad()
def final_norm_gain(model: ModelHandle) -> Float[Tensor, "d_model"]:
    """Elementwise gain of the final norm (RMSNorm or LayerNorm), measured through the model.

    The norm is applied to ``±1`` alternating (mean 0, RMS 1) and to zeros; the difference
    divided by the input is the gain, whatever the parametrisation (Gemma's ``1 + w`` included).
    Ones when the model has no ``ln_final``. Float32 on the CPU.
    """
    d = int(model.cfg.d_model)
    if getattr(model, "ln_final", None) is None:
        return torch.ones(d)
    alt = torch.ones(d)
    alt[1::2] = -1
    if d % 2:
        alt[-1] = 0  # keep the mean at zero
    out = apply_final_norm(model, torch.stack([alt, torch.zeros_like(alt)]))
    diff = (out[0] - out[1]).float().cpu()  # subtracted in the model's dtype, as the norm computes
    ones = torch.ones_like(alt)
    return torch.where(alt != 0, diff / torch.where(alt != 0, alt, ones), ones)


def _token_ids(tokens: Sequence[int] | Tensor) -> Tensor:
    return (tokens if isinstance(tokens, Tensor) else torch.as_tensor(list(tokens), dtype=torch.long)).long()


def concept_readout(
    model: ModelHandle,
    concept_tokens: Sequence[int] | Tensor,
    other_tokens: Sequence[int] | Tensor | None = None,
    *,
    fold_norm: bool = True,
) -> Float[Tensor, "d_model"]:
    """Residual direction whose logit-lens readout raises the concept tokens over the others.

    ``W_U[:, concept].mean − W_U[:, others].mean`` (others omitted: the vocabulary mean),
    times the final norm's gain (:func:`final_norm_gain`) when ``fold_norm``. Float32 on the CPU.
    """
    w_u = model.W_U.detach().float().cpu()  # [d_model, d_vocab]
    pos = _token_ids(concept_tokens)
    if pos.numel() == 0:
        raise InvalidArgumentError("concept_tokens", concept_tokens, "at least one token id")
    direction = w_u[:, pos].mean(1)
    if other_tokens is None:
        direction = direction - w_u.mean(1)
    else:
        neg = _token_ids(other_tokens)
        if neg.numel():
            direction = direction - w_u[:, neg].mean(1)
    if fold_norm:
        direction = direction * final_norm_gain(model)
    return direction


def lens_resid(
    model: ModelHandle,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    vector: ConceptVector | None = None,
    alpha: float = 0.0,
    unit: Unit = "norm",
    steer_layers: Sequence[int] | None = None,
    check_model: bool = True,
    batch_size: int = 16,
) -> Float[Tensor, "batch layer d_model"]:
    """``resid_post`` of ``layers`` at the last token, with ``vector`` transplanted if given.

    One forward pass per batch serves every read-out layer. With a vector (and ``alpha != 0``)
    ``steer_layers`` says where it is added; it defaults to ``layers`` when one layer is read.
    Feed the result to :func:`logits_from_resid` for the read-out.
    """
    layer_list = check_layers(model, layers)
    context: ContextManager[Any] = nullcontext()
    if vector is not None and alpha != 0:
        if steer_layers is None and len(layer_list) != 1:
            raise InvalidArgumentError(
                "steer_layers", None, "the layers the vector is added at, when several layers are read"
            )
        steer = list(layer_list if steer_layers is None else steer_layers)
        context = transplant(model, vector, alpha=alpha, layers=steer, unit=unit, check_model=check_model)
    with context:
        return capture(model, prompts, layers=layer_list, batch_size=batch_size)


def logit_lens(
    model: ModelHandle,
    prompts: Sequence[str],
    layer: int,
    *,
    vector: ConceptVector | None = None,
    alpha: float = 0.0,
    unit: Unit = "norm",
    steer_layers: Sequence[int] | None = None,
    check_model: bool = True,
    batch_size: int = 16,
    logits: bool = False,
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token probabilities read from ``resid_post`` of block ``layer`` at the last token.

    With a ``vector`` (and ``alpha != 0``) the read-out is taken while it is transplanted at
    ``steer_layers`` (default: ``[layer]``, so the read-out sees the offset just added).
    ``logits=True`` returns logits instead of probabilities.
    """
    resid = lens_resid(model, prompts, [layer], vector=vector, alpha=alpha, unit=unit, steer_layers=steer_layers,
                       check_model=check_model, batch_size=batch_size)[:, 0]
    out = logits_from_resid(model, resid)
    return out if logits else out.softmax(-1)


@dataclass(frozen=True)
class TokenShift:
    """Per prompt, the ``k`` tokens whose probability rises most and the ``k`` that fall most."""

    rising: Int[Tensor, "batch k"]
    rising_delta: Float[Tensor, "batch k"]
    falling: Int[Tensor, "batch k"]
    falling_delta: Float[Tensor, "batch k"]
    """Probability changes (after − before); negative for falling tokens."""

    @property
    def k(self) -> int:
        return int(self.rising.shape[1])


def token_shift(
    before: Float[Tensor, "batch d_vocab"], after: Float[Tensor, "batch d_vocab"], *, k: int = 10
) -> TokenShift:
    """Top-``k`` rising and falling tokens of ``after − before`` per row (probabilities)."""
    if before.shape != after.shape:
        raise ValueError(f"before {tuple(before.shape)} and after {tuple(after.shape)} differ in shape")
    delta = after.double() - before.double()
    up = delta.topk(k, dim=-1)
    down = (-delta).topk(k, dim=-1)
    return TokenShift(up.indices, up.values.float(), down.indices, (-down.values).float())


def token_label(tokenizer: Any, token_id: int) -> str:
    """How a token is shown in tables: its decoded text, stripped.

    Blank or unprintable text (whitespace, control characters, part of a multi-byte
    character, which decodes to U+FFFD) is shown as the repr() of the raw token string
    instead, so distinct tokens keep distinct labels.
    """
    text = tokenizer.decode([int(token_id)])
    shown = text.strip()
    if shown and shown.isprintable() and "\ufffd" not in shown:
        return shown
    raw = tokenizer.convert_ids_to_tokens(int(token_id))
    return repr(raw if raw is not None else text)


def count_tokens(ids: Int[Tensor, "batch k"], tokenizer: Any) -> list[tuple[str, int]]:
    """(token, count) over all rows, most frequent first (Table 8's "token (count)").

    Tokens are counted by their displayed label (:func:`token_label`), so ids that decode to
    the same word (``"happy"`` and ``" happy"``) are counted together. Ties keep the order in
    which the labels first appear.
    """
    counts: Counter[str] = Counter()
    for row in ids.tolist():
        # a label counts once per prompt even if two of its ids are in the row
        counts.update(list(dict.fromkeys(token_label(tokenizer, i) for i in row)))
    return counts.most_common()


def topk_overlap(a: Int[Tensor, "batch k"], b: Int[Tensor, "batch k"]) -> dict[str, Any]:
    """How much two top-k token sets agree, per prompt: mean |A ∩ B| / k and mean Jaccard."""
    if a.shape != b.shape:
        raise ValueError(f"top-k sets of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    k = a.shape[1]
    shared, jaccard = [], []
    for ra, rb in zip(a.tolist(), b.tolist()):
        sa, sb = set(ra), set(rb)
        shared.append(len(sa & sb) / k)
        jaccard.append(len(sa & sb) / len(sa | sb))
    n = max(1, len(shared))
    return {"k": int(k), "mean_shared_fraction": sum(shared) / n, "mean_jaccard": sum(jaccard) / n,
            "per_prompt_shared": shared}


def _cell(token: str) -> str:
    return token.replace("|", "\\|").replace("\n", "\\n")


def _fmt(pairs: Sequence[tuple[str, int]], top: int) -> str:
    return ", ".join(f"{_cell(tok)} ({n})" for tok, n in pairs[:top])


def shift_markdown(
    table: Mapping[str, Mapping[str, Sequence[tuple[str, int]]]], *, top: int = 10, title: str = ""
) -> str:
    """Markdown table: one row per concept, "token (count)" lists of rising and falling tokens.

    ``table[concept]["rising"]`` / ``["falling"]`` are :func:`count_tokens` outputs.
    """
    lines = [f"### {title}", ""] if title else []
    lines += ["| concept | tokens rising most (count) | tokens falling most (count) |", "|---|---|---|"]
    for concept, sides in table.items():
        lines.append(f"| {concept} | {_fmt(list(sides.get('rising', [])), top)} | "
                     f"{_fmt(list(sides.get('falling', [])), top)} |")
    return "\n".join(lines) + "\n"


def shift_csv(table: Mapping[str, Mapping[str, Sequence[tuple[str, int]]]]) -> str:
    """CSV with columns concept, direction, rank, token, count (every counted token)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["concept", "direction", "rank", "token", "count"])
    for concept, sides in table.items():
        for direction, pairs in sides.items():
            for rank, (tok, n) in enumerate(pairs, start=1):
                writer.writerow([concept, direction, rank, tok, n])
    return buf.getvalue()
