"""Built-in text the project writes itself, and loaders for user-supplied data in the same format.

* Emotion scenarios: six emotions, 70 short scenarios each, describing a situation without
  naming the emotion (``contrans_tl/data/emotions/{emotion}.json``, a JSON list of strings).
  ``emotion_scenarios(directory)`` reads any directory of such files, e.g. the public RepE set.
* Neutral sentences: 400 emotionally flat sentences used to align two models' hidden states.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from contrans_tl.errors import EmptyPromptsError

__all__ = ["EMOTIONS", "emotion_scenarios", "neutral_sentences"]

EMOTIONS: tuple[str, ...] = ("happiness", "sadness", "anger", "fear", "disgust", "surprise")
"""The six emotions of the paper's emotion experiment, in plotting order."""


def _data_dir() -> Path:
    return Path(str(files("contrans_tl") / "data"))


def emotion_scenarios(
    directory: str | Path | None = None, emotions: tuple[str, ...] = EMOTIONS
) -> dict[str, list[str]]:
    """Scenarios per emotion from ``directory`` (default: the built-in set)."""
    root = Path(directory) if directory is not None else _data_dir() / "emotions"
    out: dict[str, list[str]] = {}
    for emotion in emotions:
        path = root / f"{emotion}.json"
        if not path.is_file():
            raise EmptyPromptsError(f"no scenario file for {emotion!r}: expected {path}")
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items) or not items:
            raise EmptyPromptsError(f"{path} must be a non-empty JSON list of strings")
        out[emotion] = items
    return out


def neutral_sentences() -> list[str]:
    """The built-in neutral alignment corpus (400 sentences)."""
    text = (_data_dir() / "neutral.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]
