"""The built-in neutral corpus, and where the package keeps its data.

Neutral sentences: 400 emotionally flat sentences the project wrote, used to pair two models'
hidden states when fitting a map. Generic text: 32 paragraphs of encyclopedic prose the project
wrote (about 3,400 tokens), disjoint from both, on which fluency under steering is measured
(:mod:`contrans_tl.fluency`). Task data (emotion scenarios, TruthfulQA, ToxiGen) is
loaded by its task in :mod:`contrans_tl.tasks`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

__all__ = ["data_dir", "neutral_sentences", "generic_texts"]


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
