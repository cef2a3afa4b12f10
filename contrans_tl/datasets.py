"""The built-in neutral corpus, where the package keeps its data, and the checks every data loader shares.

Neutral sentences: 400 emotionally flat sentences the project wrote, used to pair two models'
hidden states when fitting a map. Task data (emotion scenarios, TruthfulQA, ToxiGen, WikiSplit)
is loaded by its task in :mod:`contrans_tl.tasks`; those loaders read and check their files with
the helpers here, so a bad file is one named :class:`~contrans_tl.errors.DataFormatError` that
says which file, which row and what is wrong — not a UnicodeDecodeError, an AttributeError on a
short row, or a label silently read as False.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping, Sequence

from contrans_tl.errors import DataFormatError, DataUnavailableError

__all__ = ["data_dir", "neutral_sentences", "read_text", "parse_label", "check_items", "check_scenarios"]


def data_dir() -> Path:
    """The package's data folder (``contrans_tl/data``)."""
    return Path(str(files("contrans_tl") / "data"))


def neutral_sentences() -> list[str]:
    """The built-in neutral alignment corpus (400 sentences)."""
    text = (data_dir() / "neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_text(path: str | Path) -> str:
    """A data file's text as UTF-8 (a leading byte-order mark dropped).

    Raises :class:`DataUnavailableError` if it cannot be read, :class:`DataFormatError` naming the
    file and the byte if it is not UTF-8.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataUnavailableError(f"cannot read {path}: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None


_TRUE = {"1", "true", "yes"}
_FALSE = {"0", "false", "no"}


def parse_label(value: Any, where: str) -> bool:
    """A truth label: ``1``/``0``, ``true``/``false`` (any case), ``yes``/``no`` or a JSON bool/0/1.

    Anything else is a :class:`DataFormatError` naming ``where`` (file and row): a label is never
    silently read as False.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise DataFormatError(f"{where}: label {value!r} is not a truth value (1/0, true/false, yes/no)")


def check_items(items: Sequence[Any], where: str, what: str = "item") -> list[str]:
    """``items`` if every one is a string with text and none repeats (after stripping spaces).

    A blank or repeated item is a :class:`DataFormatError` naming ``where`` and its index: a repeat
    would land in two splits (refinement and evaluation, validation and test) at once.
    """
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise DataFormatError(f"{where}: {what} {i} is a {type(item).__name__}, not text")
        if not item.strip():
            raise DataFormatError(f"{where}: {what} {i} is empty or only whitespace")
        key = item.strip()
        if key in seen:
            raise DataFormatError(f"{where}: {what} {i} repeats {what} {seen[key]} ({key[:60]!r}); "
                                  "each must appear once")
        seen[key] = i
    return list(items)


def check_scenarios(data: Mapping[str, Sequence[Any]], source: str | Path) -> dict[str, list[str]]:
    """Scenario lists per emotion, checked: each non-empty, no blank scenario, none repeated within an
    emotion or across two (it would count for both labels). ``source`` names where they came from.

    :func:`contrans_tl.tasks.emotion.emotion_scenarios` returns ``check_scenarios(out, root)``.
    """
    owner: dict[str, str] = {}
    for emotion, items in data.items():
        where = str(Path(source) / f"{emotion}.json")
        if not items:
            raise DataFormatError(f"{where} holds no scenarios")
        for item in check_items(items, where, "scenario"):
            if item.strip() in owner:
                raise DataFormatError(f"{where}: scenario {item.strip()[:60]!r} is also a scenario of "
                                      f"{owner[item.strip()]!r}: a scenario belongs to one emotion")
            owner[item.strip()] = emotion
    return {emotion: list(items) for emotion, items in data.items()}
