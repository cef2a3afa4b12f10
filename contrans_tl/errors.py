"""Every exception contrans_tl raises, each named for the problem it reports.

All derive from :class:`ContransError`, so ``except ContransError`` catches every bad input,
and each also derives from the builtin a caller would expect (ValueError, OSError, ...).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ContransError",
    "InvalidArgumentError",
    "EmptyPromptsError",
    "PromptTooLongError",
    "WidthMismatchError",
    "ModelMismatchError",
    "LayerIndexError",
    "NonFiniteError",
    "ArtifactError",
    "ModelUnavailableError",
    "DataUnavailableError",
    "DataFormatError",
    "ConceptFileError",
    "LabelTokenError",
    "SettingsMismatchError",
]


class ContransError(Exception):
    """Base class of every error contrans_tl raises on bad input."""


class InvalidArgumentError(ContransError, ValueError):
    """An argument has the wrong type, is out of range, or is not one of the accepted values.

    The message names the argument, the value given and what is accepted.
    """

    def __init__(self, argument: str, value: Any, accepted: str) -> None:
        self.argument, self.value, self.accepted = argument, value, accepted
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        super().__init__(f"{argument}={shown} is not accepted: expected {accepted}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across executor processes
        return (type(self), (self.argument, self.value, self.accepted))


class EmptyPromptsError(ContransError, ValueError):
    """A prompt or text list (positive, negative or corpus) is empty, or a prompt has no text."""


class PromptTooLongError(ContransError, ValueError):
    """A prompt has more tokens than the model's context window."""


class WidthMismatchError(ContransError, ValueError):
    """A vector's or map's width does not match the model's d_model."""


class ModelMismatchError(ContransError, ValueError):
    """An artifact was made for another model than the one it is applied to."""


class LayerIndexError(ContransError, IndexError):
    """A layer index is outside the model's range of blocks."""


class NonFiniteError(ContransError, FloatingPointError):
    """NaN or inf appeared in activations, vectors, logits or fitted maps."""


class ArtifactError(ContransError, OSError):
    """An artifact file is missing, truncated, corrupt or of the wrong kind."""


class ModelUnavailableError(ContransError, RuntimeError):
    """A model cannot be loaded: offline package missing, folder empty, or hub unreachable."""


class DataUnavailableError(ContransError, FileNotFoundError):
    """A data set is neither at the given path nor reachable on the hub."""


class DataFormatError(ContransError, ValueError):
    """A data file exists but its content is not in the expected format."""


class ConceptFileError(DataFormatError):
    """A concept file (docs/concepts.md) is malformed: the message names the file, the key and what is accepted."""


class LabelTokenError(ContransError, ValueError):
    """Two label words of a task start with the same token under this tokenizer, so they cannot be told apart."""


class SettingsMismatchError(ContransError, ValueError):
    """A resumable run's output folder holds results made under other settings."""
