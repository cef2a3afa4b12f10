"""The model handle: what contrans_tl needs of a loaded model, as a type.

:func:`contrans_tl.load_model` returns TransformerLens 4's ``TransformerBridge``, which has all
of it. The library is typed against this small Protocol instead of ``nn.Module`` (which has
none of these attributes) or the bridge class itself (whose import costs seconds), so a
reader sees in one place which parts of the bridge the three steps rely on.
"""

from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterator, Protocol, Sequence

import torch
from torch import Tensor

__all__ = ["ModelHandle", "Hook"]

Hook = Callable[..., "Tensor | None"]
"""A TransformerLens hook: ``fn(activation, *, hook) -> new activation | None``."""


class ModelHandle(Protocol):
    """A loaded model as the library uses it (a TransformerBridge, or anything shaped like one)."""

    cfg: Any
    """Read: ``d_model``, ``n_layers``, ``n_ctx``, ``d_vocab``, ``default_prepend_bos``."""
    tokenizer: Any
    """The Hugging Face tokenizer (``encode``, ``decode``, offsets, ``get_vocab``)."""
    embed: Any
    """``embed.W_E`` gives the model's device and dtype."""
    unembed: Any
    ln_final: Any
    original_model: Any
    """The wrapped Hugging Face model (plain forwards for the benchmarks' floor)."""

    @property
    def W_U(self) -> Tensor: ...

    def __call__(self, input: Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def run_with_cache(self, input: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Any]: ...

    def hooks(self, fwd_hooks: Sequence[tuple[str, Hook]] = ..., *args: Any, **kwargs: Any) -> ContextManager[Any]: ...

    def generate(self, input: Tensor, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...
