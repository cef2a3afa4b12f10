"""Map corpora as a choice: a spec string → the texts a map is fitted on, with provenance.

The map of STEP 2 can be fitted on any text both models read. Which text matters: a map fitted
on text from the concept's own domain points much closer to the target's native direction than
one fitted on generic sentences (issue 23). A spec names the text, so analyses and the CLI take
it as one option and every map records what it was fitted on:

* ``neutral`` / ``neutral:N`` — the built-in neutral sentences (all, or the first N);
* ``file:PATH`` — one text per line of a UTF-8 file (blank lines dropped);
* ``wikisplit:PATH`` / ``wikisplit:PATH:N`` — WikiSplit's complex sentences (the paper's corpus);
* ``concept`` — texts the caller supplies: the concept's own contrast prompts and unlabeled
  domain text, never evaluation items;
* unions joined by ``+`` (``concept+neutral``): parts in order, each text once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from contrans_tl import validate
from contrans_tl.datasets import load_wikisplit, neutral_sentences, read_text
from contrans_tl.errors import DataFormatError, DataUnavailableError, InvalidArgumentError

__all__ = ["MapCorpus", "corpus_digest", "resolve_corpus", "read_text_lines"]


def corpus_digest(texts: Sequence[str]) -> str:
    """sha256 (hex) of the texts in order, each UTF-8 and NUL-terminated.

    :func:`contrans_tl.pairing.corpus_hash` (what captures record) is its first 16 characters,
    so a map's corpus can be checked against the states it was fitted on.
    """
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass(frozen=True)
class MapCorpus:
    """The texts a map is fitted on, the spec that named them, and what a map records of them."""

    texts: tuple[str, ...]
    spec: str
    provenance: dict[str, Any] = field(default_factory=dict)
    """``spec``, ``n_texts``, ``sha256`` (:func:`corpus_digest`) and ``parts`` (each part's spec
    and number of texts before the union's de-duplication)."""


def read_text_lines(path: str | Path, *, what: str = "text file") -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped; named errors for missing, binary or empty files."""
    path = Path(path)
    if not path.is_file():
        raise DataUnavailableError(f"no {what} at {path}")
    text = read_text(path)  # the loaders' one reader: UTF-8 (a byte-order mark dropped), a named error if not
    if "\x00" in text:
        raise DataFormatError(f"{path} holds NUL bytes (a binary file?): a {what} holds one UTF-8 text per line")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataFormatError(f"{path} holds no text (every line is blank): a {what} holds one text per line")
    return lines


def resolve_corpus(spec: str, *, concept_texts: Sequence[str] | None = None) -> MapCorpus:
    """The texts a corpus spec names (see the module doc), de-duplicated in order.

    ``concept_texts`` are what ``concept`` stands for: the concept's own contrast prompts and
    unlabeled domain text (never evaluation items); they are only read when the spec names
    ``concept``. Raises :class:`InvalidArgumentError` for a bad spec or a missing ``concept_texts``,
    :class:`DataUnavailableError` for a missing file, :class:`DataFormatError` for an unreadable one.
    """
    parts = validate.corpus_spec("corpus", spec)
    texts: dict[str, None] = {}
    described = []
    for part in parts:
        got = list(dict.fromkeys(_part_texts(spec, part, concept_texts)))
        described.append({"spec": _part_spec(part), "n_texts": len(got)})
        texts.update(dict.fromkeys(got))
    ordered = tuple(texts)
    provenance = {"spec": spec, "n_texts": len(ordered), "sha256": corpus_digest(ordered), "parts": described}
    return MapCorpus(ordered, spec, provenance)


def _part_spec(part: validate.CorpusPart) -> str:
    kind, path, n = part
    return ":".join(str(x) for x in (kind, path, n) if x is not None)


def _part_texts(spec: str, part: validate.CorpusPart, concept_texts: Sequence[str] | None) -> list[str]:
    kind, path, n = part
    if kind == "neutral":
        sentences = neutral_sentences()
        if n is not None and n > len(sentences):
            raise InvalidArgumentError("corpus", spec, f"'neutral:N' with N <= {len(sentences)} (the built-in sentences)")
        return sentences[:n]
    if kind == "concept":
        if concept_texts is None:
            raise InvalidArgumentError(
                "concept_texts", None, f"the concept's own texts (contrast prompts, unlabeled domain text; a list "
                f"of strings) when the corpus spec {spec!r} names 'concept'")
        return validate.texts("concept_texts", concept_texts, what="concept texts")
    assert path is not None  # validate.corpus_spec gives file and wikisplit parts a path
    if kind == "file":
        return read_text_lines(path, what="corpus file")
    return load_wikisplit(path, n=n)
