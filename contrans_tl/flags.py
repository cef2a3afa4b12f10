"""Command-line values: the argparse ``type=`` functions of every ``contrans`` flag.

A bad flag is a one-line error before anything runs: each function checks its text with the
value checks of :mod:`contrans_tl.validate` and turns their error into argparse's
(``contrans: error: contrans CMD: argument --FLAG: <message>``, exit 2).
tests/test_bad_inputs.py walks every subcommand's actions, refuses a flag without one of these
(or ``choices``), and feeds each flag the bad values of its type. Paths are checked for what can
be known without touching them (existence, kind, a writable ancestor); nothing is created at
parse time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from contrans_tl import validate
from contrans_tl.errors import ContransError, InvalidArgumentError

__all__ = [
    "FLAG_TYPES",
    "positive_int_flag",
    "nonnegative_int_flag",
    "finite_float_flag",
    "positive_float_flag",
    "nonnegative_float_flag",
    "fraction_flag",
    "depth_flag",
    "ratio_flag",
    "ridge_flag",
    "alpha_or_auto_flag",
    "int_list_flag",
    "layer_list_flag",
    "layers_or_auto_flag",
    "float_list_flag",
    "name_list_flag",
    "text_flag",
    "model_flag",
    "model_list_flag",
    "hookpoint_template_flag",
    "device_flag",
    "existing_file_flag",
    "text_file_flag",
    "existing_dir_flag",
    "existing_path_flag",
    "data_path_flag",
    "out_dir_flag",
    "out_file_flag",
    "estimator_flag",
    "corpus_flag",
]

T = TypeVar("T")

def _flag(check: Callable[[], T]) -> T:
    try:
        return check()
    except (ContransError, ValueError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def positive_int_flag(text: str) -> int:
    """An integer >= 1 (counts, sizes, batch sizes, workers, threads)."""
    return _flag(lambda: validate.integer("value", _int_text("value", text), low=1))


def nonnegative_int_flag(text: str) -> int:
    """An integer >= 0 (seeds, counts where 0 means none)."""
    return _flag(lambda: validate.integer("value", _int_text("value", text), low=0))


def finite_float_flag(text: str) -> float:
    """A finite number (NaN, inf and overflowing literals like ``1e400`` are refused)."""
    return _flag(lambda: validate.real("value", _float_text(text)))


def positive_float_flag(text: str) -> float:
    """A finite number > 0 (budgets, scales, tokens per step)."""
    return _flag(lambda: validate.real("value", _float_text(text), low=0.0, low_open=True))


def nonnegative_float_flag(text: str) -> float:
    """A finite number >= 0 (factors where 0 turns something off)."""
    return _flag(lambda: validate.real("value", _float_text(text), low=0.0))


def fraction_flag(text: str) -> float:
    """A number in [0, 1) (a share held out)."""
    return _flag(lambda: validate.fraction("value", _float_text(text)))


def depth_flag(text: str) -> float:
    """A relative depth in (0, 1] (1 = the last block)."""
    return _flag(lambda: validate.real("value", _float_text(text), low=0.0, high=1.0, low_open=True))


def ratio_flag(text: str) -> float:
    """A finite ratio >= 1 (a bound on perplexity relative to the unsteered model)."""
    return _flag(lambda: validate.real("value", _float_text(text), low=1.0))


def ridge_flag(text: str) -> float | str:
    """``auto`` or a number >= 0."""
    return "auto" if text == "auto" else _flag(lambda: validate.real("ridge", _float_text(text, "'auto' or a number >= 0"), low=0.0))


def alpha_or_auto_flag(text: str) -> float | str:
    """``auto`` or a finite number (a strength)."""
    return "auto" if text == "auto" else _flag(lambda: validate.real("alpha", _float_text(text, "'auto' or a number")))


def int_list_flag(text: str) -> tuple[int, ...]:
    """``"3,5"`` → (3, 5): comma-separated ints, at least one; an empty item (``1,,2``) is refused."""
    return _flag(lambda: tuple(_int_text("value", x) for x in _items(text)))


def layer_list_flag(text: str) -> tuple[int, ...]:
    """``"3,5"`` → (3, 5): distinct block indices >= 0 (the model's range is checked when it is loaded)."""

    def check() -> tuple[int, ...]:
        layers = tuple(validate.integer("layer", _int_text("layer", x), low=0) for x in _items(text))
        if len(set(layers)) != len(layers):
            raise InvalidArgumentError("layers", text, "distinct block indices (a repeated layer would be applied twice)")
        return layers

    return _flag(check)


def layers_or_auto_flag(text: str) -> tuple[int, ...] | str:
    """``auto`` or distinct block indices, as :func:`layer_list_flag`."""
    return "auto" if text == "auto" else layer_list_flag(text)


def float_list_flag(text: str) -> tuple[float, ...]:
    """``"0,0.1,0.5"`` → (0.0, 0.1, 0.5): comma-separated finite numbers, at least one, no empty item."""
    return _flag(lambda: tuple(validate.real("value", _float_text(x)) for x in _items(text)))


def name_list_flag(text: str) -> tuple[str, ...]:
    """``"a,b"`` → ("a", "b"): comma-separated names, at least one, no empty or repeated item."""

    def check() -> tuple[str, ...]:
        names = tuple(_items(text))
        if len(set(names)) != len(names):
            raise InvalidArgumentError("names", text, "distinct names (one appears twice)")
        return names

    return _flag(check)


def text_flag(text: str) -> str:
    """Free text with at least one non-blank character (a prompt, a revision name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is blank: give some text")
    return text


def model_flag(text: str) -> str:
    """A model: built-in name, hub id (ORG/NAME), local checkpoint folder or ``.gguf`` file.

    Blank names are refused; a name that can only be a path (``.gguf``, or starting with ``/``,
    ``.``, ``~``) must exist. Whether a hub id exists is only known when it loads.
    """
    name = text_flag(text).strip()
    path = Path(name).expanduser()
    if name.endswith(".gguf") and not path.is_file():
        raise argparse.ArgumentTypeError(f"no such GGUF file: {name}")
    if name.startswith(("/", ".", "~")) and not path.exists():
        raise argparse.ArgumentTypeError(f"no such local model folder: {name} (a hub id looks like ORG/NAME)")
    return name


def model_list_flag(text: str) -> tuple[str, ...]:
    """Comma-separated models, each as :func:`model_flag`, no empty or repeated item."""
    return tuple(model_flag(name) for name in name_list_flag(text))


def hookpoint_template_flag(text: str) -> str:
    """An HF module name template with ``{layer}`` (``layers.{layer}``)."""
    if "{layer}" not in text or not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no '{{layer}}': give a module name template like layers.{{layer}}")
    return text


def device_flag(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, present on this machine (see :func:`device`)."""
    return _flag(lambda: validate.device("device", text))  # type: ignore[return-value]


def existing_file_flag(text: str) -> str:
    """The path of an existing, non-empty, readable file (an artifact: a vector, a map)."""
    return _existing(text, folder=False)


def text_file_flag(text: str) -> str:
    """The path of an existing UTF-8 text file with at least one non-blank line."""
    existing_file_flag(text)
    try:
        content = Path(text).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {text} as UTF-8 text: {err}") from None
    if not content.strip():
        raise argparse.ArgumentTypeError(f"{text} holds only whitespace: one text per line expected")
    return text


def existing_dir_flag(text: str) -> str:
    """The path of an existing, readable folder."""
    return _existing(text, folder=True)


def existing_path_flag(text: str) -> str:
    """An existing data file (non-empty) or folder, readable (loaders take either)."""
    return _existing(text, folder=None)


def _existing(text: str, *, folder: bool | None) -> str:
    """``text`` if it names an existing, readable file (``folder=False``: non-empty), folder, or either (None)."""
    noun = {True: "folder", False: "file", None: "file or folder"}[folder]
    path = Path(text)
    if not text.strip() or not path.exists():
        raise argparse.ArgumentTypeError(f"no such {noun}: {text!r}")
    is_dir = path.is_dir()
    if folder is not None and is_dir != folder:
        raise argparse.ArgumentTypeError(f"{text} is a {'file' if folder else 'folder'}, not a {noun}")
    if not is_dir and path.stat().st_size == 0:
        raise argparse.ArgumentTypeError(f"{text} is empty")
    if not os.access(path, os.R_OK | (os.X_OK if is_dir else 0)):
        raise argparse.ArgumentTypeError(f"{text} is not readable")
    return text


def data_path_flag(text: str) -> str:
    """``hub`` (the Hugging Face hub), or an existing data file or folder."""
    return text if text == "hub" else existing_path_flag(text)


def out_dir_flag(text: str) -> str:
    """A folder to write into (see :func:`out_dir`)."""
    return _flag(lambda: validate.out_dir("path", text))


def out_file_flag(text: str) -> str:
    """A file to write (see :func:`out_file`)."""
    return _flag(lambda: validate.out_file("path", text))


def estimator_flag(text: str) -> str:
    """One of :data:`validate.MAP_ESTIMATORS` (``--map-estimator``, ``contrans fit --estimator``)."""
    return _flag(lambda: validate.choice("estimator", text, validate.MAP_ESTIMATORS))


def corpus_flag(text: str) -> str:
    """A map-corpus spec whose syntax is valid (``--map-corpus``); files are read when it is resolved."""
    return _flag(lambda: (validate.corpus_spec("corpus", text), text)[1])


FLAG_TYPES: tuple[Callable[[str], Any], ...] = (
    positive_int_flag, nonnegative_int_flag, finite_float_flag, positive_float_flag, nonnegative_float_flag,
    fraction_flag, depth_flag, ratio_flag, ridge_flag, alpha_or_auto_flag, int_list_flag, layer_list_flag,
    layers_or_auto_flag, float_list_flag, name_list_flag, text_flag, model_flag, model_list_flag, hookpoint_template_flag,
    device_flag, existing_file_flag, text_file_flag, existing_dir_flag, existing_path_flag, data_path_flag,
    out_dir_flag, out_file_flag, estimator_flag, corpus_flag,
)
"""Every flag type above: the ``type=`` a ``contrans`` flag may declare (tests check each one's bad values)."""


def _items(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise ValueError(f"{text!r} lists nothing: give comma-separated values")
    if not all(items):
        raise ValueError(f"{text!r} has an empty item: give comma-separated values without ',,' or a trailing comma")
    return items


def _int_text(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgumentError(name, text, "an integer") from None


def _float_text(text: str, accepted: str = "a number") -> float:
    try:
        return float(text)
    except ValueError:
        raise InvalidArgumentError("value", text, accepted) from None
