"""STEP 3 — transplant: add alpha · v[l] to the target's resid_post while the context is open.

The hook adds a precomputed ``[d_model]`` offset at ``blocks.{l}.hook_resid_post`` at every
position, so it acts on the prompt and on each token of ``generate`` (KV cache on or off).
Several vectors, or nested contexts, add up. Leaving the context removes exactly the hooks it
added, also when the body raises.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import check_layers, encode, model_device, pad_batch, pad_token_id, resid_hook_name
from contrans_tl.errors import ContransError, NonFiniteError
from contrans_tl.handle import ModelHandle

__all__ = ["Unit", "steering_offsets", "transplant", "generate"]

Unit = Literal["raw", "norm"]
"""How alpha is read. "raw": the offset is alpha · v[l]. "norm": the offset is
alpha · mean‖resid_post[l]‖ · v[l] / ‖v[l]‖ — alpha is a fraction of the layer's typical
residual norm (recorded in the vector), so one setting carries across models."""


def steering_offsets(
    vectors: Sequence[ConceptVector],
    alphas: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    unit: Unit = "raw",
) -> dict[int, Float[Tensor, "d_model"]]:
    """The summed offset added at each layer (only layers with a non-zero offset)."""
    total: dict[int, Tensor] = {}
    for vector, alpha in zip(vectors, alphas, strict=True):
        use = vector.layers if layers is None else tuple(layers)
        for layer in use:
            v = vector.vectors[layer].double()
            if unit == "norm":
                if vector.layer_norms is None or float(vector.layer_norms[layer]) <= 0:
                    raise ContransError(
                        f"alpha in norm units needs the target's residual norm at layer {layer}, "
                        "which this vector does not record; use unit='raw'"
                    )
                length = v.norm()
                v = v / length * float(vector.layer_norms[layer]) if length > 0 else v
            offset = float(alpha) * v
            total[layer] = total[layer] + offset if layer in total else offset
    return {layer: off.float() for layer, off in total.items() if bool(off.any())}


@contextmanager
def transplant(
    model: ModelHandle,
    vector: ConceptVector | Sequence[ConceptVector],
    *,
    alpha: float | Sequence[float],
    layers: Sequence[int] | Literal["auto"] | None = None,
    unit: Unit = "raw",
    check_model: bool = True,
) -> Iterator[dict[int, Tensor]]:
    """Transplant concept vector(s) into ``model`` for the duration of the ``with`` block.

    ``layers`` restricts the layers steered (default: the vector's own ``layers``; "auto":
    :func:`contrans_tl.diagnostics.auto_layers`, the pairs whose map fits well); ``alpha``
    is one strength or one per vector; ``unit`` says how alpha is read (see :data:`Unit`).
    Yields the per-layer offsets actually added (useful for checks and logs).
    """
    vectors = [vector] if isinstance(vector, ConceptVector) else list(vector)
    alphas = [float(alpha)] * len(vectors) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) != len(vectors):
        raise ContransError(f"{len(vectors)} vectors but {len(alphas)} alphas")
    for v in vectors:
        if check_model:
            v.check_model(model)
        elif v.d_model != int(model.cfg.d_model):  # type: ignore[attr-defined]
            v.check_model(model)  # width is never optional: raises WidthMismatchError
    if isinstance(layers, str):
        if layers != "auto":
            raise ContransError(f"layers must be a list of ints, None or 'auto', not {layers!r}")
        from contrans_tl.diagnostics import auto_layers  # lazy: diagnostics builds on this module

        layers = auto_layers(vectors)
    if layers is not None:
        check_layers(model, layers)
    offsets = steering_offsets(vectors, alphas, layers=layers, unit=unit)
    if not all(torch.isfinite(off).all() for off in offsets.values()):
        raise NonFiniteError("steering offset has NaN or inf entries")
    device = model_device(model)
    dtype = model.embed.W_E.dtype  # type: ignore[union-attr]
    placed = {layer: off.to(device=device, dtype=dtype) for layer, off in offsets.items()}

    def make_hook(offset: Tensor):
        def add_offset(resid: Tensor, *, hook: object) -> Tensor:
            return resid + offset.to(resid.device)

        return add_offset

    fwd_hooks = [(resid_hook_name(layer), make_hook(off)) for layer, off in placed.items()]
    # The bridge's own context manager records each handle as it is added and removes exactly
    # those in `finally`, so a failure halfway through registration leaves the model clean.
    with model.hooks(fwd_hooks=fwd_hooks):  # type: ignore[operator]
        yield offsets


@torch.inference_mode()
def generate(
    model: ModelHandle,
    prompts: str | Sequence[str],
    *,
    max_new_tokens: int = 20,
    use_kv_cache: bool = True,
) -> list[str]:
    """Greedy continuations (new text only), under any active :func:`transplant` context.

    Prompts are tokenized with the library's BOS policy and left-padded with an attention
    mask, so batched generation equals one prompt at a time.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    ids, _ = encode(model, prompt_list)
    batch = pad_batch(ids, pad_id=pad_token_id(model), padding_side="left")
    device = model_device(model)
    out = model.generate(  # type: ignore[operator]
        batch.input_ids.to(device),
        attention_mask=batch.attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        use_past_kv_cache=use_kv_cache,
        stop_at_eos=False,
        return_type="tokens",
        verbose=False,
    )
    new = out[:, batch.input_ids.shape[1] :]
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in new]  # type: ignore[union-attr]
