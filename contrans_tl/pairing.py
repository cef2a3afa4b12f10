"""Aligned hidden-state samples of two models on the same text, across tokenizers.

Two models with different tokenizers have no common token positions, but they share the
text's word boundaries. For every word boundary each model contributes its resid_post at the
last token that ends at or before it, so one forward pass per text yields one aligned sample
per word (not one per text). The positions depend only on the text and the model's own
tokenizer, so each model can be captured once and paired with any other later (size matrix).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from jaxtyping import Float, Int
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from contrans_tl.capture import capture_at, check_layers, encode
from contrans_tl.corpus import corpus_digest
from contrans_tl.files import atomic_path
from contrans_tl import validate
from contrans_tl.errors import ArtifactError, EmptyPromptsError
from contrans_tl.models import ModelIdentity, identity
from contrans_tl.handle import ModelHandle

__all__ = [
    "word_boundaries",
    "positions_at_boundaries",
    "corpus_hash",
    "PairedStates",
    "capture_paired",
]

Scheme = Literal["words", "tokens"]

_WORD = re.compile(r"\S+")


def word_boundaries(text: str) -> list[int]:
    """Character offsets where each whitespace-delimited word ends (exclusive)."""
    return [m.end() for m in _WORD.finditer(text)]


def positions_at_boundaries(offsets: Sequence[tuple[int, int]], boundaries: Sequence[int]) -> list[int]:
    """For each boundary, the index of the last real token ending at or before it.

    Special tokens (empty span, such as BOS) never count; a boundary that no token ends
    before falls back to the first real token.
    """
    real = [(i, end) for i, (start, end) in enumerate(offsets) if end > start]
    if not real:
        raise EmptyPromptsError("text has no real tokens to align")
    out: list[int] = []
    j = 0
    for b in boundaries:
        while j + 1 < len(real) and real[j + 1][1] <= b:
            j += 1
        out.append(real[j][0])
    return out


def corpus_hash(texts: Sequence[str]) -> str:
    """Short sha256 of the corpus, recorded in maps so a fit can be traced to its text.

    The first 16 hex digits of :func:`contrans_tl.corpus.corpus_digest`.
    """
    return corpus_digest(texts)[:16]


@dataclass(frozen=True)
class PairedStates:
    """One model's resid_post at aligned positions of a corpus (one row per sample)."""

    states: Float[Tensor, "n_samples layer d_model"]
    text_index: Int[Tensor, "n_samples"]
    """Which text each sample comes from (held-out splits are made by text, not by sample)."""
    layers: tuple[int, ...]
    """The model layers the ``layer`` axis holds."""
    model: ModelIdentity
    corpus: str
    """Hash of the corpus (:func:`corpus_hash`)."""
    scheme: str
    """"words" (one sample per word boundary) or "tokens" (every token, same tokenizer only)."""

    def layer(self, layer: int) -> Float[Tensor, "n_samples d_model"]:
        """Samples of one model layer."""
        if layer not in self.layers:
            raise ArtifactError(f"layer {layer} was not captured (have {list(self.layers)})")
        return self.states[:, self.layers.index(layer)]

    def save(self, path: str | Path) -> Path:
        """One safetensors file; the size matrix keeps one per model on disk."""
        path = Path(path)
        meta = {
            "name": self.model.name,
            "revision": "" if self.model.revision is None else self.model.revision,
            "n_layers": str(self.model.n_layers),
            "d_model": str(self.model.d_model),
            "layers": ",".join(map(str, self.layers)),
            "corpus": self.corpus,
            "scheme": self.scheme,
        }
        with atomic_path(path) as tmp:
            save_file({"states": self.states.contiguous(), "text_index": self.text_index}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PairedStates":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            tensors = load_file(str(path))
            model = ModelIdentity(
                meta["name"], meta["revision"] or None, int(meta["n_layers"]), int(meta["d_model"])
            )
            return cls(
                tensors["states"],
                tensors["text_index"],
                tuple(int(x) for x in meta["layers"].split(",")),
                model,
                meta["corpus"],
                meta["scheme"],
            )
        except (SafetensorError, OSError, KeyError, ValueError) as err:
            raise ArtifactError(f"{path}: not readable aligned states ({err})") from err


def _positions(model: ModelHandle, texts: Sequence[str], scheme: Scheme) -> list[list[int]]:
    ids, offsets = encode(model, texts, with_offsets=True)
    assert offsets is not None  # with_offsets=True always returns them
    if scheme == "tokens":
        return [[i for i, (s, e) in enumerate(offs) if e > s] for offs in offsets]
    return [positions_at_boundaries(offs, word_boundaries(t)) for offs, t in zip(offsets, texts)]


def unique_texts(texts: Sequence[str]) -> list[str]:
    """``texts`` in order with repeats removed (warns when any were)."""
    unique = list(dict.fromkeys(texts))
    if len(unique) < len(texts):
        warnings.warn(f"the corpus repeats {len(texts) - len(unique)} text(s): each is used once", stacklevel=3)
    return unique


def capture_paired(
    model: ModelHandle,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    scheme: Scheme = "words",
    batch_size: int = 8,
    progress: str | None = None,
) -> PairedStates:
    """Capture ``model``'s resid_post at aligned positions of every text (see module doc).

    Repeated texts are kept once (with a warning): a text on both sides of the held-out split
    would make the held-out R² a training score.
    """
    texts = unique_texts(validate.texts("texts", texts, what="corpus texts"))
    validate.choice("scheme", scheme, ["words", "tokens"])
    validate.integer("batch_size", batch_size, low=1)
    layer_list = check_layers(model, layers)
    positions = _positions(model, texts, scheme)
    states = capture_at(model, texts, positions, layers=layer_list, batch_size=batch_size, progress=progress)
    text_index = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, p in enumerate(positions)])
    return PairedStates(states, text_index, tuple(layer_list), identity(model), corpus_hash(texts), scheme)
