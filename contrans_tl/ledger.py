"""The forward ledger: which token rows a run pushed through each model, under which steering.

While :func:`record_forwards` is open, the library's forward paths (:func:`~contrans_tl.capture.capture`,
:func:`~contrans_tl.capture.capture_at`, :func:`~contrans_tl.capture.next_token_logits`) note every
row they run, with the shared prefix and the steering setting active at the time (a digest of
the offsets :func:`~contrans_tl.transplant.transplant` adds). Rows seen twice under one setting
are counted once in :meth:`Ledger.unique`: that is the work a run *must* do, the benchmark's
floor (``bench/demo.py`` times it with plain Hugging Face forwards). Closed, the ledger costs
one dictionary lookup per forward batch.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

from torch import Tensor

__all__ = ["Ledger", "record_forwards", "note", "steering", "active_setting"]

Kind = Literal["resid", "logits", "sequence"]
"""What a row was run for: hidden states (no unembedding), next-token logits, or the logits of
every position (the fluency instrument)."""

_LEDGER: list["Ledger"] = []
_STEERING: dict[int, list[str]] = {}


@dataclass
class Ledger:
    """Rows per model: every row as run (``seen``) and the distinct (setting, prefix, kind, row) groups."""

    groups: dict[str, dict[tuple[str, tuple[int, ...], str], set[tuple[int, ...]]]] = field(default_factory=dict)
    seen_rows: dict[str, int] = field(default_factory=dict)
    seen_tokens: dict[str, int] = field(default_factory=dict)
    seen_prefixes: dict[str, int] = field(default_factory=dict)

    def add(self, model: str, rows: Sequence[Sequence[int]], prefix: Sequence[int], kind: Kind, setting: str) -> None:
        group = self.groups.setdefault(model, {}).setdefault((setting, tuple(prefix), kind), set())
        group.update(tuple(r) for r in rows)
        self.seen_rows[model] = self.seen_rows.get(model, 0) + len(rows)
        self.seen_tokens[model] = self.seen_tokens.get(model, 0) + sum(len(r) for r in rows)
        if prefix:
            self.seen_prefixes[model] = self.seen_prefixes.get(model, 0) + 1
            self.seen_tokens[model] += len(prefix)

    def unique(self) -> dict[str, dict[str, int]]:
        """Per model: distinct rows, their tokens and the prefix tokens (once per setting and prefix)."""
        out = {}
        for model, groups in self.groups.items():
            rows = sum(len(g) for g in groups.values())
            tokens = sum(len(r) for g in groups.values() for r in g)
            prefixes = sum(len(p) for (_, p, _) in groups if p)
            out[model] = {"rows": rows, "row_tokens": tokens, "prefixes": sum(1 for (_, p, _) in groups if p),
                          "prefix_tokens": prefixes, "tokens": tokens + prefixes}
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain data (lists) for a JSON file; :meth:`from_json` reads it back."""
        return {
            "models": {
                model: [{"setting": s, "prefix": list(p), "kind": k, "rows": sorted(list(r) for r in rows)}
                        for (s, p, k), rows in groups.items()]
                for model, groups in self.groups.items()
            },
            "seen_rows": self.seen_rows,
            "seen_tokens": self.seen_tokens,
            "seen_prefixes": self.seen_prefixes,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Ledger":
        ledger = cls(seen_rows=dict(data["seen_rows"]), seen_tokens=dict(data["seen_tokens"]),
                     seen_prefixes=dict(data.get("seen_prefixes", {})))
        for model, groups in data["models"].items():
            ledger.groups[model] = {(g["setting"], tuple(g["prefix"]), g["kind"]): {tuple(r) for r in g["rows"]}
                                    for g in groups}
        return ledger


@contextmanager
def record_forwards() -> Iterator[Ledger]:
    """Note every forward the library runs while open (nested ledgers all receive them)."""
    ledger = Ledger()
    _LEDGER.append(ledger)
    try:
        yield ledger
    finally:
        _LEDGER.remove(ledger)


def _label(model: Any) -> str:
    return str(getattr(model.cfg, "model_name", type(model).__name__))


def active_setting(model: Any) -> str:
    """The steering active on ``model`` now: "" unsteered, else the digests of the open contexts."""
    return "+".join(_STEERING.get(id(model), []))


def note(model: Any, rows: Sequence[Sequence[int]], *, prefix: Sequence[int] = (), kind: Kind) -> None:
    """Record ``rows`` run through ``model`` (a no-op unless a ledger is open)."""
    if not _LEDGER:
        return
    setting = active_setting(model)
    for ledger in _LEDGER:
        ledger.add(_label(model), rows, prefix, kind, setting)


@contextmanager
def steering(model: Any, offsets: Mapping[int, Tensor]) -> Iterator[None]:
    """Mark ``offsets`` as active on ``model`` (called by transplant; the digest only while a ledger is open;
    no offsets, no change: an all-zero transplant runs the unsteered model)."""
    if not _LEDGER or not offsets:
        yield
        return
    digest = hashlib.sha1()
    for layer in sorted(offsets):
        digest.update(str(layer).encode())
        digest.update(offsets[layer].detach().float().cpu().contiguous().numpy().tobytes())
    stack = _STEERING.setdefault(id(model), [])
    stack.append(digest.hexdigest()[:16])
    try:
        yield
    finally:
        stack.pop()
        if not stack:
            _STEERING.pop(id(model), None)

