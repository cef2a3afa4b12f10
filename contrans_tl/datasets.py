"""The built-in neutral corpus, the WikiSplit reader, and where the package keeps its data.

Neutral sentences: 400 emotionally flat sentences the project wrote, used to pair two models'
hidden states when fitting a map. Generic text: 32 paragraphs of encyclopedic prose the project
wrote (about 3,400 tokens), disjoint from the neutral sentences and every task's prompts, on which
fluency under steering is measured (:mod:`contrans_tl.fluency`). WikiSplit (the paper's neutral
text) is read here, in core, because it serves both as a map corpus (:mod:`contrans_tl.corpus`)
and as perplexity text (:mod:`contrans_tl.tasks.perplexity`). Task data (emotion scenarios, TruthfulQA, ToxiGen) is
loaded by its task in :mod:`contrans_tl.tasks`.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

from contrans_tl.errors import DataFormatError, DataUnavailableError

__all__ = ["data_dir", "neutral_sentences", "generic_texts", "detokenize_wikisplit", "load_wikisplit"]


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
    Sentences shorter than ``min_words`` and duplicates are dropped; ``n`` keeps the first N.
    """
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
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:
                sentence = detokenize_wikisplit(line.split("\t", 1)[0])
                if len(sentence.split()) < min_words or sentence in seen:
                    continue
                seen.add(sentence)
                out.append(sentence)
                if n is not None and len(out) >= n:
                    break
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path} is not UTF-8 text, so not a WikiSplit TSV ({err})") from None
    if not out:
        raise DataFormatError(f"{path} holds no sentences of {min_words} or more words")
    return out
