"""The one capture path: prompts → residual stream after chosen blocks, at chosen tokens.

Prompts are tokenized here (one BOS policy for every caller), left-padded with an attention
mask, and run through ``run_with_cache`` with a names filter on ``blocks.{l}.hook_resid_post``.
With left padding every row's last real token sits at position −1, so ``pos_slice=-1`` keeps
only ``[batch, d_model]`` per layer: memory does not grow with prompt length beyond the
forward pass itself. Results are float32 on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from contrans_tl import ledger, validate
from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError, LayerIndexError, NonFiniteError, PromptTooLongError
from contrans_tl.handle import ModelHandle

__all__ = [
    "TokenBatch",
    "encode",
    "pad_batch",
    "resid_hook_name",
    "check_layers",
    "capture",
    "capture_at",
    "Prefix",
    "run_prefix",
    "prompt_ids",
    "forward_rows",
    "next_token_logits",
    "model_device",
    "pad_token_id",
]


def resid_hook_name(layer: int) -> str:
    """Hook point of the residual stream after block ``layer`` (the HF decoder layer's output)."""
    return f"blocks.{layer}.hook_resid_post"


def check_layers(model: ModelHandle, layers: Sequence[int] | None) -> list[int]:
    """Validate layer indices against the model (all layers when None)."""
    n_layers = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n_layers))
    out = [validate.integer(f"layers[{i}]", layer) for i, layer in enumerate(layers)]
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise LayerIndexError(f"layers: layer(s) {bad} out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    return out


def encode(
    model: ModelHandle, texts: Sequence[str], *, with_offsets: bool = False, allow_long: bool = False
) -> tuple[list[list[int]], list[list[tuple[int, int]]] | None]:
    """Token ids of each text, with BOS prepended once when the model expects it.

    BOS is added when ``cfg.default_prepend_bos`` is set and the text does not already begin
    with it (chat-template text for SmolLM2 starts with its BOS ``<|im_start|>``). With
    ``with_offsets`` the character span of every token is returned too (BOS gets (0, 0)).
    """
    tokenizer = model.tokenizer
    enc = tokenizer(
        list(texts), add_special_tokens=False, return_offsets_mapping=with_offsets
    )
    bos = tokenizer.bos_token_id
    prepend = bool(getattr(model.cfg, "default_prepend_bos", True)) and bos is not None
    ids_out: list[list[int]] = []
    offsets_out: list[list[tuple[int, int]]] = []
    n_ctx = int(model.cfg.n_ctx)
    for i, ids in enumerate(enc["input_ids"]):
        ids = list(ids)
        offs = [tuple(o) for o in enc["offset_mapping"][i]] if with_offsets else []
        if prepend and (not ids or ids[0] != bos):
            ids = [bos] + ids
            offs = [(0, 0)] + offs
        if not ids:
            raise EmptyPromptsError(f"text {i} tokenizes to no tokens: {texts[i]!r}")
        if len(ids) > n_ctx and not allow_long:
            raise PromptTooLongError(
                f"text {i} has {len(ids)} tokens, more than the model's context of {n_ctx}: "
                f"{texts[i][:80]!r}..."
            )
        ids_out.append(ids)
        offsets_out.append(offs)
    return ids_out, (offsets_out if with_offsets else None)


@dataclass(frozen=True)
class TokenBatch:
    """Padded token ids with their mask; ``lengths`` are the real (unpadded) lengths."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    lengths: list[int]
    padding_side: str


def pad_batch(
    ids: Sequence[Sequence[int]], *, pad_id: int, padding_side: str = "left"
) -> TokenBatch:
    """Pad token lists to one length. Left padding puts every last real token at −1."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        input_ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return TokenBatch(input_ids, mask, [len(r) for r in ids], padding_side)


def pad_token_id(model: ModelHandle) -> int:
    """Id used for padding: pad, else eos, else 0 (masked out either way)."""
    tok = model.tokenizer
    for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def _batches(
    model: ModelHandle,
    ids: list[list[int]],
    batch_size: int,
    padding_side: str,
    desc: str | None,
) -> Iterator[tuple[slice, TokenBatch]]:
    """Length-sorted batches (less padding) yielded with the slice of sorted order they cover."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    pad_id = pad_token_id(model)
    starts = range(0, len(ids), batch_size)
    for start in tqdm(starts, desc=desc, disable=desc is None, leave=False):
        chunk = ids[start : start + batch_size]
        yield slice(start, start + len(chunk)), pad_batch(chunk, pad_id=pad_id, padding_side=padding_side)


def model_device(model: ModelHandle) -> torch.device:
    """Device of the token embedding, where inputs must go (first device under device_map)."""
    return model.embed.W_E.device if hasattr(model, "embed") else next(model.parameters()).device


def _check_finite(acts: Tensor, layers: list[int], first_index: int) -> None:
    if not torch.isfinite(acts).all():
        bad = (~torch.isfinite(acts)).nonzero()[0].tolist()
        raise NonFiniteError(
            f"non-finite activation (NaN or inf) at prompt {first_index + bad[0]}, layer {layers[bad[1]]}; "
            "check the model's dtype (fp16 overflow?) and the steering strength"
        )


def _sorted_order(ids: list[list[int]]) -> list[int]:
    return sorted(range(len(ids)), key=lambda i: len(ids[i]))


@torch.inference_mode()
def capture(
    model: ModelHandle,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 16,
    padding_side: str = "left",
    progress: str | None = None,
) -> Float[Tensor, "batch layer d_model"]:
    """resid_post of every requested layer at each prompt's last real token.

    Left padding (the default) keeps only position −1 inside ``run_with_cache`` via
    ``pos_slice``; right padding caches the whole sequence per batch and gathers each row's
    last real token from the attention mask (kept as a check of the padding logic).
    """
    prompts = validate.texts("prompts", prompts)
    validate.integer("batch_size", batch_size, low=1)
    validate.choice("padding_side", padding_side, ["left", "right"])
    layer_list = check_layers(model, layers)
    ids, _ = encode(model, prompts)
    order = _sorted_order(ids)
    names = [resid_hook_name(layer) for layer in layer_list]
    out = torch.empty(len(ids), len(layer_list), int(model.cfg.d_model), dtype=torch.float32)
    device = model_device(model)
    ledger.note(model, ids, kind="resid")
    for span, batch in _batches(model, [ids[i] for i in order], batch_size, padding_side, progress):
        _, cache = model.run_with_cache(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            names_filter=names,
            pos_slice=-1 if padding_side == "left" else None,
            return_type=None,
            logits_to_keep=1,  # skip the vocabulary projection of every position
        )
        if padding_side == "left":  # pos_slice=-1 leaves [batch, 1, d_model] per hook
            stacked = torch.stack([cache[name][:, -1] for name in names], dim=1)
        else:
            last = torch.tensor(batch.lengths, device=device) - 1
            rows = torch.arange(len(last), device=device)
            stacked = torch.stack([cache[name][rows, last] for name in names], dim=1)
        stacked = stacked.float().cpu()
        _check_finite(stacked, layer_list, span.start)
        out[order[span]] = stacked
    return out


@torch.inference_mode()
def capture_at(
    model: ModelHandle,
    texts: Sequence[str],
    positions: Sequence[Sequence[int]],
    *,
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: str | None = None,
) -> Float[Tensor, "n_samples layer d_model"]:
    """resid_post at given token positions of each text (positions index the unpadded ids).

    Used for word-aligned map fitting: one forward pass per text yields one sample per
    position. Rows come out text by text, positions in the order given.
    """
    texts = validate.texts("texts", texts, what="texts")
    validate.integer("batch_size", batch_size, low=1)
    if len(positions) != len(texts):
        raise InvalidArgumentError("positions", f"{len(positions)} position lists", f"one list per text ({len(texts)})")
    layer_list = check_layers(model, layers)
    ids, _ = encode(model, texts)
    names = [resid_hook_name(layer) for layer in layer_list]
    pieces: list[Tensor | None] = [None] * len(texts)
    order = _sorted_order(ids)
    device = model_device(model)
    ledger.note(model, ids, kind="resid")
    for span, batch in _batches(model, [ids[i] for i in order], batch_size, "left", progress):
        _, cache = model.run_with_cache(
            batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            names_filter=names,
            return_type=None,
            logits_to_keep=1,  # skip the vocabulary projection of every position
        )
        width = batch.input_ids.shape[1]
        for row, text_index in enumerate(order[span]):
            shift = width - batch.lengths[row]
            pos = torch.tensor([p + shift for p in positions[text_index]], dtype=torch.long)
            if len(pos) and (pos.min() < shift or pos.max() >= width):
                raise IndexError(f"position out of range for text {text_index}")
            rows = torch.stack([cache[name][row, pos.to(device)] for name in names], dim=1)
            pieces[text_index] = rows.float().cpu()
        del cache
    out = torch.cat([p for p in pieces if p is not None], dim=0)
    _check_finite(out, layer_list, 0)
    return out


@dataclass(frozen=True)
class Prefix:
    """A context shared by many rows (a few-shot block), run once: its ids and the KV cache rows continue from."""

    ids: list[int]
    cache: object


@torch.inference_mode()
def run_prefix(model: ModelHandle, prefix: str) -> Prefix:
    """Run ``prefix`` (with the library's BOS policy) once under any active hooks and keep its KV cache.

    Hooks act on the prefix as on every row after it: a steered prefix is steered, as in a
    single unbatched forward of prefix + row.
    """
    (ids,), _ = encode(model, [prefix])
    _, cache = model(  # only its KV cache is needed: no vocabulary projection of its positions
        torch.tensor([ids], device=model_device(model)), return_type="logits_and_cache", logits_to_keep=1
    )
    return Prefix(list(ids), cache)


def prompt_ids(model: ModelHandle, prompts: Sequence[str], prefix: Prefix | None) -> list[list[int]]:
    """Token ids of each prompt: with the BOS policy alone, or tokenized on its own (no BOS) after ``prefix``."""
    if prefix is None:
        return encode(model, prompts)[0]
    ids = [list(row) for row in model.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    n_ctx = int(model.cfg.n_ctx)
    for i, row in enumerate(ids):
        if not row:
            raise EmptyPromptsError(f"prompt {i} tokenizes to no tokens")
        if len(prefix.ids) + len(row) > n_ctx:
            raise PromptTooLongError(
                f"prefix + prompt {i} has {len(prefix.ids) + len(row)} tokens, more than the model's context of {n_ctx}"
            )
    return ids


def forward_rows(model: ModelHandle, batch: TokenBatch, prefix: Prefix | None, *,
                 logits_to_keep: int) -> Float[Tensor, "batch keep d_vocab"]:
    """Logits of the last ``logits_to_keep`` positions of a left-padded batch, continuing ``prefix``'s cache."""
    device = model_device(model)
    mask = batch.attention_mask.to(device)
    extra: dict[str, object] = {}
    if prefix is not None:
        cache = copy.deepcopy(prefix.cache)
        cache.batch_repeat_interleave(len(batch.lengths))  # type: ignore[attr-defined]
        seen = torch.ones(len(batch.lengths), len(prefix.ids), dtype=mask.dtype, device=device)
        mask = torch.cat([seen, mask], dim=1)
        extra["past_key_values"] = cache
    return model(batch.input_ids.to(device), attention_mask=mask, logits_to_keep=logits_to_keep, **extra)


@torch.inference_mode()
def next_token_logits(
    model: ModelHandle,
    prompts: Sequence[str],
    *,
    prefix: str | None = None,
    batch_size: int = 16,
    progress: str | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Logits of the next token after each prompt (float32, CPU), under any active hooks.

    ``prefix`` (e.g. a few-shot block shared by every prompt) is run once and its KV cache
    reused for each batch: the model sees ``encode(prefix) + tokens(prompt)`` (the prompt
    tokenized on its own, no BOS), with hooks acting on prefix and prompt alike, at a
    fraction of the cost of repeating the prefix in every row.
    """
    prompts = validate.texts("prompts", prompts)
    validate.integer("batch_size", batch_size, low=1)
    shared = run_prefix(model, prefix) if prefix is not None else None
    ids = prompt_ids(model, prompts, shared)
    order = _sorted_order(ids)
    ledger.note(model, ids, prefix=shared.ids if shared is not None else (), kind="logits")
    chunks: list[Tensor] = []
    for _, batch in _batches(model, [ids[i] for i in order], batch_size, "left", progress):
        chunks.append(forward_rows(model, batch, shared, logits_to_keep=1)[:, -1].float().cpu())
    stacked = torch.cat(chunks)
    out = torch.empty_like(stacked)
    out[order] = stacked
    if not torch.isfinite(out).all():
        raise NonFiniteError("non-finite logits: check the model's dtype and the steering strength")
    return out
