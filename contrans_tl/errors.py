"""Named exceptions: each says what was wrong with the input and how to fix it."""

from __future__ import annotations


class ContransError(Exception):
    """Base class of every error contrans_tl raises on bad input."""


class EmptyPromptsError(ContransError, ValueError):
    """A prompt list (positive, negative or corpus) is empty, or paired lists differ in length."""


class PromptTooLongError(ContransError, ValueError):
    """A prompt has more tokens than the model's context window."""


class WidthMismatchError(ContransError, ValueError):
    """A vector's or map's width does not match the model's d_model."""


class ModelMismatchError(ContransError, ValueError):
    """An artifact was made for another model than the one it is applied to."""


class LayerIndexError(ContransError, IndexError):
    """A layer index is outside the model's range of blocks."""


class NonFiniteError(ContransError, FloatingPointError):
    """NaN or inf appeared in activations, vectors or fitted maps."""


class ArtifactError(ContransError, OSError):
    """An artifact file is missing, truncated, corrupt or of the wrong kind."""


class ModelUnavailableError(ContransError, RuntimeError):
    """A model cannot be loaded: offline package missing or hub unreachable."""
