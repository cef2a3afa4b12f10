"""Resumable grid runs: one JSON file per finished cell, written atomically, skipped on rerun.

A sweep killed at any point loses at most the cells that were running; a rerun with the same
store recomputes only the missing cells. Cells run serially in this process by default, or
through any ``concurrent.futures.Executor`` the caller passes (a process pool, submitit's
``AutoExecutor`` for SLURM, a Dask/Ray executor): the store only ever writes results back
from the calling process, so executors need no shared filesystem semantics beyond returning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
import warnings
from concurrent.futures import Executor, Future, as_completed
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

from tqdm.auto import tqdm

from contrans_tl.errors import ArtifactError, ContransError, SettingsMismatchError
from contrans_tl.files import json_ready, write_json

__all__ = ["CellStore", "cell_key", "grid_axis", "run_option", "settings_fingerprint"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


_MISSING = object()


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; ``_MISSING`` when there is no file, or (with a warning) when it is corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return _MISSING
    except (UnicodeDecodeError, json.JSONDecodeError):
        warnings.warn(f"{path} is corrupt (a write was interrupted?): treated as missing and recomputed", stacklevel=3)
        return _MISSING


CellRole = Literal["grid", "run"]
"""How a Config field relates to the cells: "grid" = an axis named in every cell's key (a new value
adds cells, finished ones stay valid); "run" = changes how a run goes, never a cell's value (output
folder, batch size, device, progress). Every other field changes cell values and is fingerprinted."""


def grid_axis(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A Config field that is an axis of the grid: every cell key names its value."""
    return _role_field("grid", default, factory)


def run_option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A Config field that changes how a run goes but never a cell's value."""
    return _role_field("run", default, factory)


def _role_field(role: CellRole, default: Any, factory: Callable[[], Any] | None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"cell_role": role})
    return dataclasses.field(default=default, metadata={"cell_role": role})


def settings_fingerprint(cfg: Any) -> dict[str, Any]:
    """Every field of the dataclass ``cfg`` that changes a cell's value, as strict JSON.

    Derived by construction: all fields count except those declared with :func:`grid_axis` or
    :func:`run_option`, so a new Config field is guarded from the day it is added.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ContransError(f"settings_fingerprint needs a dataclass instance, not {type(cfg).__name__}")
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if "cell_role" not in f.metadata}
    return json.loads(json.dumps(json_ready(values), sort_keys=True))


MAX_KEY = 160
"""Longest cell key kept as written; longer ones (parts naming deep local paths) end in a hash,
so a cell file name stays well under the file system's 255 bytes."""


def cell_key(**parts: object) -> str:
    """A stable, filename-safe key from named parts: ``cell_key(ckpt="step1", alpha=0.5)``."""
    key = "__".join(f"{k}={_UNSAFE.sub('-', str(v))}" for k, v in parts.items())
    if len(key) <= MAX_KEY:
        return key
    return f"{key[:MAX_KEY - 17]}~{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class CellStore:
    """A directory of finished cells, ``<root>/<key>.json`` each (and ``<key>.time``: what computing it cost).

    With ``settings`` (a JSON-serialisable dict of everything that changes a cell's value) the
    store remembers them in ``<root>/.settings`` (JSON) and refuses to be reused with other ones,
    so a resumed run never mixes cells computed under different settings.
    """

    SETTINGS = ".settings"  # not *.json: globbing the cells never picks it up

    def __init__(self, root: str | Path, *, settings: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.reused_wall_s = 0.0
        """Recorded compute time of the cells and artifacts this run reused instead of computing."""
        self.reused_cpu_s = 0.0
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ArtifactError(f"cannot use {self.root} as a cell store: {err.strerror or err}") from None
        if settings is not None:
            self._claim(json.loads(json.dumps(settings, sort_keys=True)))

    def _claim(self, mine: dict[str, Any]) -> None:
        path = self.root / self.SETTINGS
        theirs = _read_json(path)
        if theirs is not _MISSING:
            if theirs != mine:
                changed = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
                raise SettingsMismatchError(
                    f"{self.root} holds cells computed with other settings (differing: {', '.join(changed)}; "
                    f"stored {[theirs.get(k) for k in changed]}, now {[mine.get(k) for k in changed]}). "
                    "Use another output directory, or the same settings to resume."
                )
        else:
            write_json(path, mine, sort_keys=True)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        """Whether a complete cell is stored (a corrupt one counts as missing, with a warning)."""
        return _read_json(self.path(key)) is not _MISSING

    def get(self, key: str) -> Any:
        value = _read_json(self.path(key))
        if value is _MISSING:
            raise KeyError(key)
        return value

    def put(self, key: str, value: Any) -> None:
        """Write atomically: a reader (or a resumed run) never sees half a cell."""
        write_json(self.path(key), value, sort_keys=True)

    def all(self) -> dict[str, Any]:
        """Every finished cell, by key (corrupt cells are left out, with a warning)."""
        cells = {p.stem: _read_json(p) for p in sorted(self.root.glob("*.json"))}
        return {k: v for k, v in cells.items() if v is not _MISSING}

    def run(
        self,
        cells: Mapping[str, Any] | Iterable[str],
        fn: Callable[[Any], Any],
        *,
        executor: Executor | None = None,
        desc: str | None = None,
    ) -> dict[str, Any]:
        """Compute ``fn(arg)`` for every cell not yet stored; return all requested cells.

        ``cells`` maps key → argument (or is an iterable of keys, each its own argument).
        With an ``executor``, ``fn`` and its argument must be picklable.
        """
        todo = dict(cells) if isinstance(cells, Mapping) else {k: k for k in cells}
        done = {k: _read_json(self.path(k)) for k in todo}  # each stored cell read once
        missing = {k: arg for k, arg in todo.items() if done[k] is _MISSING}
        for key in todo.keys() - missing.keys():
            self.reused(key)
        bar = tqdm(total=len(todo), initial=len(todo) - len(missing), desc=desc, disable=desc is None)
        if executor is None:
            for key, arg in missing.items():
                wall, cpu = time.perf_counter(), time.process_time()
                value = fn(arg)
                self.put(key, value)
                self.record_time(key, time.perf_counter() - wall, time.process_time() - cpu)
                done[key] = self.get(key)  # as stored (JSON): the same value a resumed run reads
                bar.update()
        else:  # the work runs elsewhere: only the wall time from submission is known here
            start = time.perf_counter()
            futures: dict[Future, str] = {executor.submit(fn, arg): key for key, arg in missing.items()}
            for future in as_completed(futures):
                key = futures[future]
                self.put(key, future.result())
                self.record_time(key, time.perf_counter() - start, None)
                done[key] = self.get(key)
                bar.update()
        bar.close()
        return {k: done[k] for k in todo}

    # ---- compute time of finished work, so a resumed run can report what the reused work cost ----
    def record_time(self, key: str, wall_s: float, cpu_s: float | None) -> None:
        """Remember what computing ``key`` (a cell, or any named artifact of the run) cost."""
        write_json(self.root / f"{key}.time", {"wall_s": round(wall_s, 3), "cpu_s": None if cpu_s is None else round(cpu_s, 3)})

    def reused(self, key: str) -> None:
        """Count ``key``'s recorded compute time as reused in this run (nothing if it has no record)."""
        record = _read_json(self.root / f"{key}.time")
        if isinstance(record, dict):
            self.reused_wall_s += float(record.get("wall_s") or 0.0)
            self.reused_cpu_s += float(record.get("cpu_s") or 0.0)
