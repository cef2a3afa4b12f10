"""Argument checks at the library's boundary: one place, one message shape.

Every public function and CLI command checks its arguments here before any work starts, so
a bad value fails at once with an :class:`~contrans_tl.errors.InvalidArgumentError` (or
:class:`EmptyPromptsError` / :class:`LayerIndexError`) naming the argument, the value given
and what is accepted, instead of a traceback from deep inside torch or a silent wrong answer.
The command line's flag types (argparse ``type=``) are built on these in :mod:`contrans_tl.flags`.
"""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Sequence, TypeVar

from contrans_tl.errors import EmptyPromptsError, InvalidArgumentError, LayerIndexError

__all__ = [
    # values (library arguments, Config fields)
    "texts",
    "choice",
    "real",
    "integer",
    "fraction",
    "layer_list",
    "layer_pairs",
    "device",
    "out_dir",
    "out_file",
    "MAP_ESTIMATORS",
    "CORPUS_KINDS",
    "corpus_spec",
]

T = TypeVar("T")


def texts(name: str, value: Any, *, what: str = "prompts") -> list[str]:
    """A non-empty list of non-blank strings (a bare string is refused: it is not a list of prompts)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(name, value, f"a list of {what} (strings); wrap a single one as [text]")
    items = list(value)
    if not items:
        raise EmptyPromptsError(f"{name}: no {what} given (an empty list)")
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidArgumentError(f"{name}[{i}]", item, "a string")
        if not item.strip():
            raise EmptyPromptsError(f"{name}[{i}] is empty or only whitespace: every one of the {what} needs text")
    return items


def choice(name: str, value: Any, options: Sequence[T]) -> T:
    """``value`` if it is exactly one of ``options`` (case and type matter)."""
    if not isinstance(value, (str, int, float, bool, type(None))) or value not in options:
        raise InvalidArgumentError(name, value, "one of " + ", ".join(repr(o) for o in options))
    return value  # type: ignore[return-value]


def real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number (not a bool, string, None or tensor) inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise InvalidArgumentError(name, value, f"a finite real number{_bounds(low, high, low_open, high_open)}")
    x = float(value)
    if (low is not None and (x < low or (low_open and x == low))) or (
        high is not None and (x > high or (high_open and x == high))
    ):
        raise InvalidArgumentError(name, value, f"a number{_bounds(low, high, low_open, high_open)}")
    return x


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None) -> int:
    """An int (not a bool or float) inside ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(name, value, f"an integer{_bounds(low, high, False, False)}")
    x = int(value)
    if (low is not None and x < low) or (high is not None and x > high):
        raise InvalidArgumentError(name, value, f"an integer{_bounds(low, high, False, False)}")
    return x


def fraction(name: str, value: Any) -> float:
    """A number in [0, 1) (a share of texts held out, say)."""
    return real(name, value, low=0.0, high=1.0, high_open=True)


def layer_list(name: str, value: Any, n_layers: int) -> list[int]:
    """Distinct block indices in ``0..n_layers-1``, at least one."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentError(name, value, "a list of block indices (ints)")
    out = [integer(f"{name}[{i}]", v) for i, v in enumerate(value)]
    if not out:
        raise InvalidArgumentError(name, value, "at least one block index (None means every layer)")
    if len(set(out)) != len(out):
        raise InvalidArgumentError(name, value, "distinct block indices (a repeated layer would be applied twice)")
    bad = [layer for layer in out if not 0 <= layer < n_layers]
    if bad:
        raise LayerIndexError(f"{name}: layer(s) {bad} out of range: the model has {n_layers} blocks (0..{n_layers - 1})")
    return out


def layer_pairs(name: str, value: Any) -> list[tuple[int, int]]:
    """A non-empty list of distinct (source layer, target layer) pairs of ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise InvalidArgumentError(name, value, "a non-empty list of (source layer, target layer) pairs")
    out = []
    for i, pair in enumerate(value):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise InvalidArgumentError(f"{name}[{i}]", pair, "a (source layer, target layer) pair of ints")
        out.append((integer(f"{name}[{i}][0]", pair[0], low=0), integer(f"{name}[{i}][1]", pair[1], low=0)))
    if len(set(out)) != len(out):
        raise InvalidArgumentError(name, value, "distinct layer pairs")
    return out


MAP_ESTIMATORS: tuple[str, ...] = ("lstsq", "ridge", "procrustes", "rrr", "whitened")
"""The map estimators of :func:`contrans_tl.reformulate.fit_map_from_states` (named here, below
reformulate, so command-line flags can check them without importing the solver)."""

CORPUS_KINDS: tuple[str, ...] = ("neutral", "file", "wikisplit", "concept")
"""The kinds of text a map-corpus spec joins with '+' (resolved by :mod:`contrans_tl.corpus`)."""

_CORPUS_ACCEPTED = ("'neutral' or 'neutral:N', 'file:PATH', 'wikisplit:PATH' or 'wikisplit:PATH:N', 'concept', "
                    "or a union of these joined by '+' (e.g. 'concept+neutral')")

CorpusPart = tuple[str, "str | None", "int | None"]
"""One part of a corpus spec: (kind, path or None, first N or None)."""


def corpus_spec(name: str, value: Any) -> list[CorpusPart]:
    """The parts of a map-corpus spec, each (kind, path, first N); the syntax only, no file is read.

    Parts are joined by '+'; a '+' followed by something that is not a kind stays inside a path
    (``file:a+b.txt``), so only a path containing '+neutral', '+file:', ... cannot be written.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidArgumentError(name, value, "a corpus spec: " + _CORPUS_ACCEPTED)
    pieces: list[str] = []
    for piece in value.split("+"):
        if pieces and piece.partition(":")[0] not in CORPUS_KINDS:
            pieces[-1] += "+" + piece  # a '+' inside a path
        else:
            pieces.append(piece)
    return [_corpus_part(name, value, piece) for piece in pieces]


def _corpus_part(name: str, spec: str, piece: str) -> CorpusPart:
    kind, colon, arg = piece.partition(":")
    if kind == "concept" and not colon:
        return ("concept", None, None)
    if kind == "neutral":
        if not colon:
            return ("neutral", None, None)
        if arg.isdigit() and int(arg) >= 1:
            return ("neutral", None, int(arg))
        raise InvalidArgumentError(name, spec, f"'neutral:N' with N an integer >= 1 (got {piece!r}); "
                                   "'neutral' alone is every built-in sentence")
    if kind == "file" and arg.strip():
        return ("file", arg, None)
    if kind == "wikisplit" and arg.strip():
        path, _, last = arg.rpartition(":")
        if path and last.isdigit():
            if int(last) < 1:
                raise InvalidArgumentError(name, spec, f"'wikisplit:PATH:N' with N >= 1 (got {piece!r})")
            return ("wikisplit", path, int(last))
        return ("wikisplit", arg, None)
    if kind in ("file", "wikisplit"):
        raise InvalidArgumentError(name, spec, f"'{kind}:PATH' with a path after the colon (got {piece!r})")
    raise InvalidArgumentError(name, spec, f"a corpus spec ({piece!r} is not a part of one): {_CORPUS_ACCEPTED}")


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device strings :func:`device` accepts: ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""


def device(name: str, value: Any) -> str | None:
    """None, or a device string this machine has: ``cpu``, ``cuda``, ``cuda:N`` (N < device count), ``mps``.

    A ``torch.device`` is accepted too (returned as its string). Checked before any model loads,
    so ``--device bogus`` or ``cuda`` on a machine without CUDA is a named error, not a torch
    RuntimeError halfway through a load.
    """
    if value is None:
        return None
    if type(value).__name__ == "device" and type(value).__module__ == "torch":
        value = str(value)
    accepted = "cpu, cuda, cuda:N or mps (a device this machine has)"
    if not isinstance(value, str):
        raise InvalidArgumentError(name, value, accepted)
    kind, _, index = value.partition(":")
    if kind not in DEVICE_TYPES or (index and (kind != "cuda" or not index.isdigit())):
        raise InvalidArgumentError(name, value, accepted)
    if kind == "cpu":
        return value
    import torch  # only for an accelerator: keeps flag parsing import-light

    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidArgumentError(name, value, f"{accepted}; this machine has no MPS device")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index and int(index) >= count):
            raise InvalidArgumentError(name, value, f"{accepted}; this machine has {count} CUDA device(s)")
    return value


def out_dir(name: str, value: Any) -> str:
    """A folder to write into: an existing folder, or one that can be created.

    Refused: an existing file, a path under a file, and a folder whose nearest existing ancestor
    this user cannot write (``os.access``; root may write anywhere, so for root only the first
    two apply). Nothing is created here.
    """
    return _writable(name, value, folder=True)


def out_file(name: str, value: Any) -> str:
    """A file to write: not an existing folder, not under a file, in a writable (or creatable) folder."""
    return _writable(name, value, folder=False)


def _writable(name: str, value: Any, *, folder: bool) -> str:
    what = "a folder to write into" if folder else "a file path to write"
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise InvalidArgumentError(name, value, what)
    path = Path(value).expanduser()
    if folder and path.exists() and not path.is_dir():
        raise InvalidArgumentError(name, str(value), f"{what} (it is an existing file)")
    if not folder and path.is_dir():
        raise InvalidArgumentError(name, str(value), f"{what} (it is a folder)")
    ancestor = path if folder and path.is_dir() else path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InvalidArgumentError(name, str(value), f"{what} (it lies under {ancestor}, which is a file)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidArgumentError(name, str(value), f"{what} (cannot write under {ancestor}: permission denied)")
    return str(value)


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return ""
    if high is None:
        return f" {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f" {'<' if high_open else '<='} {high:g}"
    return f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
