"""STEP 3 — transplant: add alpha · v[l] to the target's resid_post while the context is open.

The hook adds a precomputed ``[d_model]`` offset at ``blocks.{l}.hook_resid_post`` at every
position, so it acts on the prompt and on each token of ``generate`` (KV cache on or off).
Several vectors, or nested contexts, add up. Leaving the context removes exactly the hooks it
added, also when the body raises.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, ContextManager, Iterator, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from contrans_tl import ledger, validate
from contrans_tl.artifacts import ConceptVector
from contrans_tl.capture import encode, model_device, pad_batch, pad_token_id, resid_hook_name
from contrans_tl.errors import InvalidArgumentError, NonFiniteError
from contrans_tl.handle import Hook, ModelHandle

__all__ = ["Unit", "UNITS", "Steering", "steer", "steering_offsets", "transplant", "generate"]

Unit = Literal["raw", "norm"]
"""How alpha is read. "raw": the offset is alpha · v[l]. "norm": the offset is
alpha · mean‖resid_post[l]‖ · v[l] / ‖v[l]‖ — alpha is a fraction of the layer's typical
residual norm (recorded in the vector), so one setting carries across models."""

UNITS: tuple[str, ...] = ("raw", "norm")
"""The accepted values of :data:`Unit`."""

LOGITS_HOOK = "unembed.hook_out"
"""Hook point of the output logits: checked for NaN/inf while steering is active."""

_AUTO_LAYERS_HINT = (
    "a list of block indices or None; for automatic layers call "
    "contrans_tl.reports.layer_search.auto_layers(vectors) and pass its result"
)


def steering_offsets(
    vectors: Sequence[ConceptVector],
    alphas: Sequence[float],
    *,
    layers: Sequence[int] | None = None,
    unit: Unit = "raw",
) -> dict[int, Float[Tensor, "d_model"]]:
    """The summed offset added at each layer (only layers with a non-zero offset)."""
    validate.choice("unit", unit, UNITS)
    total: dict[int, Tensor] = {}
    for vector, alpha in zip(vectors, alphas, strict=True):
        use = vector.layers if layers is None else tuple(layers)
        for layer in use:
            v = vector.vectors[layer].double()
            if unit == "norm":
                if vector.layer_norms is None or float(vector.layer_norms[layer]) <= 0:
                    raise InvalidArgumentError(
                        "unit", unit, f"'raw' for this vector: norm units need the target's residual norm "
                        f"at layer {layer}, which the vector does not record"
                    )
                length = v.norm()
                v = v / length * float(vector.layer_norms[layer]) if length > 0 else v
            offset = float(alpha) * v
            total[layer] = total[layer] + offset if layer in total else offset
    return {layer: off.float() for layer, off in total.items() if bool(off.any())}


def _vector_list(vector: Any) -> list[ConceptVector]:
    """``vector`` as a non-empty list of ConceptVectors."""
    accepted = "a ConceptVector or a non-empty sequence of ConceptVectors"
    if isinstance(vector, ConceptVector):
        return [vector]
    if isinstance(vector, (str, bytes)) or not isinstance(vector, Sequence) or not vector:
        raise InvalidArgumentError("vector", vector, accepted)
    if not all(isinstance(v, ConceptVector) for v in vector):
        raise InvalidArgumentError("vector", vector, accepted)
    return list(vector)


def _alpha_list(alpha: Any, n_vectors: int) -> list[float]:
    """One finite strength per vector (a single number is shared by all of them)."""
    if isinstance(alpha, (str, bytes)) or not isinstance(alpha, Sequence):
        return [validate.real("alpha", alpha)] * n_vectors
    alphas = [validate.real(f"alpha[{i}]", a) for i, a in enumerate(alpha)]
    if len(alphas) != n_vectors:
        raise InvalidArgumentError("alpha", alpha, f"one number, or {n_vectors} numbers (one per vector)")
    return alphas


def _layer_list(model: ModelHandle, layers: Any) -> list[int] | None:
    """Validated steering layers (None: each vector's own layers)."""
    if layers is None:
        return None
    if isinstance(layers, str):
        raise InvalidArgumentError("layers", layers, _AUTO_LAYERS_HINT)
    return validate.layer_list("layers", layers, int(model.cfg.n_layers))


@contextmanager
def transplant(
    model: ModelHandle,
    vector: ConceptVector | Sequence[ConceptVector],
    *,
    alpha: float | Sequence[float],
    layers: Sequence[int] | None = None,
    unit: Unit = "raw",
    check_model: bool = True,
) -> Iterator[dict[int, Tensor]]:
    """Transplant concept vector(s) into ``model`` for the duration of the ``with`` block.

    ``layers`` restricts the layers steered (default: the vector's own ``layers``; for the
    layers whose map fits well, pass :func:`contrans_tl.reports.layer_search.auto_layers`);
    ``alpha`` is one strength or one per vector; ``unit`` says how alpha is read (see
    :data:`Unit`). Yields the per-layer offsets actually added (useful for checks and logs).
    """
    vectors = _vector_list(vector)
    alphas = _alpha_list(alpha, len(vectors))
    validate.choice("unit", unit, UNITS)
    for v in vectors:
        if check_model:
            v.check_model(model)
        elif v.d_model != int(model.cfg.d_model):
            v.check_model(model)  # width is never optional: raises WidthMismatchError
    steered = _layer_list(model, layers)
    offsets = steering_offsets(vectors, alphas, layers=steered, unit=unit)
    dtype = model.embed.W_E.dtype
    placed = {layer: off.to(device=model_device(model), dtype=dtype) for layer, off in offsets.items()}
    setting = f"alpha {alphas if len(alphas) > 1 else alphas[0]} (unit {unit!r})"
    for layer, off in placed.items():
        if not bool(torch.isfinite(off).all()):
            raise NonFiniteError(f"the offset at layer {layer} with {setting} is not finite in the model's {dtype}: "
                                 "lower alpha")

    def make_hook(layer: int, offset: Tensor) -> Hook:
        def add_offset(resid: Tensor, *, hook: object) -> Tensor:
            out = resid + offset.to(resid.device)
            # the squared norm, as the next block's RMSNorm/LayerNorm computes it: once that overflows
            # float32 the model silently outputs degenerate logits (an empty generation), so stop here
            if not bool(torch.isfinite(out.float().square().sum(-1)).all()):
                raise NonFiniteError(f"steering at layer {layer} with {setting} overflows the residual stream "
                                     "(NaN, inf, or a squared norm beyond float32): lower alpha")
            return out

        return add_offset

    def check_logits(logits: Tensor, *, hook: object) -> None:
        # one pass, no vocabulary-sized mask: NaN and inf both reach the minimum or the maximum
        if not bool(torch.isfinite(torch.stack(torch.aminmax(logits))).all()):
            raise NonFiniteError(f"non-finite logits (NaN or inf) under steering at layers {sorted(placed)} "
                                 f"with {setting}: lower alpha")

    fwd_hooks = [(resid_hook_name(layer), make_hook(layer, off)) for layer, off in placed.items()]
    if placed:
        fwd_hooks.append((LOGITS_HOOK, check_logits))
    # The bridge's own context manager records each handle as it is added and removes exactly
    # those in `finally`, so a failure halfway through registration leaves the model clean.
    with model.hooks(fwd_hooks=fwd_hooks), ledger.steering(model, placed):
        yield offsets


@dataclass(frozen=True)
class Steering:
    """One steering setting as a value: ``vectors`` added at ``alphas`` (one per vector) at ``layers``.

    What every analysis measures and stores is a steering, not a loose (vector, alpha, layers)
    tuple: :meth:`apply` opens the :func:`transplant` context (none when every alpha is 0), so the
    fluency instrument, the task scorers and the generation all steer the same way.
    """

    vectors: tuple[ConceptVector, ...]
    alphas: tuple[float, ...]
    layers: tuple[int, ...] | None = None
    """Target layers steered (None: each vector's own layers)."""
    unit: Unit = "norm"

    def __post_init__(self) -> None:
        vectors = _vector_list(list(self.vectors) if isinstance(self.vectors, (tuple, list)) else self.vectors)
        object.__setattr__(self, "vectors", tuple(vectors))
        alphas = list(self.alphas) if isinstance(self.alphas, (tuple, list)) else self.alphas
        object.__setattr__(self, "alphas", tuple(_alpha_list(alphas, len(vectors))))
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise InvalidArgumentError("layers", self.layers, "a sequence of block indices or None")
            object.__setattr__(self, "layers", tuple(validate.integer(f"layers[{i}]", x, low=0)
                                                     for i, x in enumerate(self.layers)))
        validate.choice("unit", self.unit, UNITS)

    @classmethod
    def single(cls, vector: ConceptVector, alpha: float, layers: Sequence[int] | None = None,
               unit: Unit = "norm") -> "Steering":
        """One vector at one strength."""
        return cls((vector,), (float(alpha),), None if layers is None else tuple(layers), unit)

    @property
    def is_null(self) -> bool:
        """True when nothing is added (every alpha is 0): the unsteered model."""
        return all(a == 0 for a in self.alphas)

    def apply(self, model: ModelHandle, *, check_model: bool = True) -> ContextManager[Any]:
        """The :func:`transplant` context of this setting on ``model`` (a no-op when :attr:`is_null`)."""
        if self.is_null:
            return nullcontext()
        return transplant(model, list(self.vectors), alpha=list(self.alphas),
                          layers=None if self.layers is None else list(self.layers), unit=self.unit,
                          check_model=check_model)


@contextmanager
def steer(model: ModelHandle, steerings: "Steering | Sequence[Steering] | None", *,
          check_model: bool = True) -> Iterator[None]:
    """Every steering in ``steerings`` applied at once (their offsets add up); None or an empty list steers nothing."""
    items = [] if steerings is None else [steerings] if isinstance(steerings, Steering) else list(steerings)
    if not all(isinstance(x, Steering) for x in items):
        raise InvalidArgumentError("steerings", steerings, "a Steering, a sequence of them, or None")
    with ExitStack() as stack:
        for item in items:
            stack.enter_context(item.apply(model, check_model=check_model))
        yield


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
    prompt_list = validate.texts("prompts", [prompts] if isinstance(prompts, str) else prompts)
    max_new_tokens = validate.integer("max_new_tokens", max_new_tokens, low=1)
    ids, _ = encode(model, prompt_list)
    batch = pad_batch(ids, pad_id=pad_token_id(model), padding_side="left")
    device = model_device(model)
    out = model.generate(
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
    return [model.tokenizer.decode(row, skip_special_tokens=True) for row in new]
