"""The built-in texts, the WikiSplit reader, where the package keeps its data, and the checks every
data loader shares.

Neutral sentences: 400 emotionally flat sentences the project wrote, used to pair two models'
hidden states when fitting a map. Generic text: 32 paragraphs of encyclopedic prose the project
wrote (about 3,400 tokens), disjoint from the neutral sentences and every task's prompts, on which
fluency under steering is measured (:mod:`contrans_tl.fluency`). WikiSplit (the paper's neutral
text) is read here, in core, because it serves both as a map corpus (:mod:`contrans_tl.corpus`)
and as perplexity text (:mod:`contrans_tl.tasks.perplexity`). Task data (emotion scenarios,
TruthfulQA, ToxiGen) is loaded by its task in :mod:`contrans_tl.tasks`; every loader reads and
checks its files with the helpers here (:func:`read_text`, :func:`parse_label`, :func:`check_items`),
so a bad file is one named :class:`~contrans_tl.errors.DataFormatError` that says which file, which
row and what is wrong — not a UnicodeDecodeError, an AttributeError on a short row, or a label
silently read as False.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping, Sequence

from contrans_tl import validate
from contrans_tl.errors import DataFormatError, DataUnavailableError

__all__ = ["data_dir", "neutral_sentences", "generic_texts", "detokenize_wikisplit", "load_wikisplit",
           "read_text", "parse_label", "check_items", "check_scenarios"]


def data_dir() -> Path:
    """The package's data folder (``contrans_tl/data``)."""
    return Path(str(files("contrans_tl") / "data"))


def neutral_sentences() -> list[str]:
    """The built-in neutral alignment corpus (400 sentences)."""
    text = (data_dir() / "neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def generic_texts() -> list[str]:
    """The built-in held-out generic text of the fluency instrument: 32 paragraphs, one per line,
    written for this project (no emotional language; disjoint from the map corpus and every task's prompts)."""
    text = (data_dir() / "generic.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
# ---- WikiSplit ------------------------------------------------------------------------------------
_DETOK = [
    (re.compile(r" ([,.;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"),
    (re.compile(r"'' ?(.*?) ?''"), r'"\1"'),
    (re.compile(r" - "), "-"),
    (re.compile(r"\s+"), " "),
]


def detokenize_wikisplit(text: str) -> str:
    """Undo WikiSplit's space-separated punctuation ("word , word ." → "word, word.")."""
    text = text.strip()
    for pattern, repl in _DETOK:
        text = pattern.sub(repl, text)
    return text.strip()


def load_wikisplit(path: str | Path, *, n: int | None = None, min_words: int = 8) -> list[str]:
    """Neutral sentences: the complex-sentence column of a WikiSplit TSV, detokenized.

    ``path`` is the TSV or a directory holding ``validation.tsv`` / ``test.tsv`` / ``train.tsv``.
    Sentences shorter than ``min_words`` and duplicates are dropped; ``n`` (>= 1) keeps the first N.
    A file that is not UTF-8, or a row without the tab-separated split column, is a named error.
    """
    if n is not None:
        validate.integer("n", n, low=1)
    validate.integer("min_words", min_words, low=1)
    path = Path(path)
    if path.is_dir():
        for name in ("validation.tsv", "test.tsv", "tune.tsv", "train.tsv"):
            if (path / name).is_file():
                path = path / name
                break
    if not path.is_file():
        raise DataUnavailableError(f"no WikiSplit TSV at {path}")
    out: list[str] = []
    seen: set[str] = set()
    for row, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataFormatError(f"{path} row {row} has one column: expected sentence<TAB>split (WikiSplit TSV)")
        sentence = detokenize_wikisplit(line.split("\t", 1)[0])
        if len(sentence.split()) < min_words or sentence in seen:
            continue
        seen.add(sentence)
        out.append(sentence)
        if n is not None and len(out) >= n:
            break
    if not out:
        raise DataFormatError(f"{path} holds no sentences of {min_words} or more words")
    return out


# ---- the checks every loader shares ----------------------------------------------------------------
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
