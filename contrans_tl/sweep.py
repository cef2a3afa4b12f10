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

from contrans_tl.datasets import data_dir
from contrans_tl.errors import ArtifactError, ContransError, SettingsMismatchError
from contrans_tl.files import json_ready, write_json

__all__ = ["CellStore", "cell_key", "grid_axis", "run_option", "input_path", "input_digest", "settings_fingerprint"]

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


CellRole = Literal["grid", "run", "input"]
"""How a Config field relates to the cells: "grid" = an axis named in every cell's key (a new value
adds cells, finished ones stay valid); "run" = changes how a run goes, never a cell's value (output
folder, batch size, device, progress); "input" = the path of a file or folder the run reads, whose
*content* is fingerprinted (:func:`input_digest`). Every other field changes cell values and is
fingerprinted by its value."""


def grid_axis(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A Config field that is an axis of the grid: every cell key names its value."""
    return _role_field("grid", default, factory)


def run_option(default: Any = dataclasses.MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A Config field that changes how a run goes but never a cell's value."""
    return _role_field("run", default, factory)


def input_path(default: str | None = None) -> Any:
    """A Config field holding the path of a data file or folder the run reads (None: built-in data).

    :func:`settings_fingerprint` records a digest of its content, not the path: a run resumed
    after the data changed is refused, one whose unchanged data moved is not.
    """
    return _role_field("input", default, None)


def _role_field(role: CellRole, default: Any, factory: Callable[[], Any] | None) -> Any:
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"cell_role": role})
    return dataclasses.field(default=default, metadata={"cell_role": role})


def settings_fingerprint(cfg: Any, *, protocol: int | str | None = None) -> dict[str, Any]:
    """Everything that changes a cell's value, as strict JSON: settings, input data and protocol.

    Derived by construction from the dataclass ``cfg``:

    * every field, by value, except those declared with :func:`grid_axis`, :func:`run_option` or
      :func:`input_path`, so a new Config field is guarded from the day it is added;
    * ``"inputs"``: per :func:`input_path` field the digest of the file or folder it names
      (:func:`input_digest`), and ``"built-in data"``: the digest of the package's data folder
      (the built-in scenarios and neutral corpus every run may read);
    * ``"protocol"``: ``protocol``, else the Config's ``PROTOCOL`` class attribute, else 1 — bump
      it when the computation of a cell changes, so cells of the old code are not reused.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise ContransError(f"settings_fingerprint needs a dataclass instance, not {type(cfg).__name__}")
    fields = dataclasses.fields(cfg)
    values: dict[str, Any] = {f.name: getattr(cfg, f.name) for f in fields if "cell_role" not in f.metadata}
    clash = {"inputs", "protocol"} & set(values)
    if clash:
        raise ContransError(f"{type(cfg).__name__} has field(s) {sorted(clash)}: names the fingerprint keeps for itself")
    inputs = {f.name: input_digest(getattr(cfg, f.name)) for f in fields if f.metadata.get("cell_role") == "input"}
    values["inputs"] = {**inputs, "built-in data": input_digest(data_dir())}
    values["protocol"] = protocol if protocol is not None else getattr(cfg, "PROTOCOL", 1)
    return json.loads(json.dumps(json_ready(values), sort_keys=True))


def input_digest(path: str | Path | None) -> str:
    """A short sha256 of what a run reads at ``path``: a file's bytes, or a folder's files (sorted
    relative names and contents; hidden files and ``__pycache__`` skipped). None → ``"built-in"``; a value that names no
    file or folder (``"hub"``, say) is kept as written."""
    if path is None:
        return "built-in"
    target = Path(path).expanduser()
    if target.is_file():
        files = [(target.name, target)]
    elif target.is_dir():
        files = [(p.relative_to(target).as_posix(), p) for p in sorted(target.rglob("*")) if p.is_file()
                 and not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(target).parts)]
    else:
        return f"not a path: {path}"
    digest = hashlib.sha256()
    for name, file in files:
        digest.update(name.encode("utf-8") + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _flat(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"inputs": {"data_dir": d}}`` → ``{"inputs.data_dir": d}``: a mismatch names the very input."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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

    def __init__(self, root: str | Path, *, settings: Mapping[str, Any] | None = None,
                 valid: Callable[[Any], bool] | None = None) -> None:
        self.root = Path(root)
        self.valid = valid
        """Whether a stored value is a complete cell (None: any JSON). One that is not (``{}``, a
        wrong-typed value) counts as corrupt: missing, with a warning, and recomputed."""
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
        """Remember ``mine`` in a new store; in a used one, refuse other settings.

        A ``.settings`` that cannot be read as a JSON object (cut short, ``[]``) is refused too:
        which settings its cells were computed with is unknown, so it cannot be claimed anew.
        """
        path = self.root / self.SETTINGS
        try:
            theirs = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            write_json(path, mine, sort_keys=True)
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            theirs = None
        if not isinstance(theirs, dict):
            raise SettingsMismatchError(
                f"{path} is damaged (not a JSON object of settings): the settings of the cells in {self.root} "
                "are unknown. Use another output directory, or delete this one to start over."
            )
        if theirs != mine:
            flat_theirs, flat_mine = _flat(theirs), _flat(mine)
            absent = "(absent)"  # a key on one side only differs even when the other side's value is None
            changed = sorted(k for k in set(flat_theirs) | set(flat_mine)
                             if k not in flat_theirs or k not in flat_mine or flat_theirs[k] != flat_mine[k])
            raise SettingsMismatchError(
                f"{self.root} holds cells computed with other settings (differing: {', '.join(changed)}; "
                f"stored {[flat_theirs.get(k, absent) for k in changed]}, now {[flat_mine.get(k, absent) for k in changed]}). "
                "Use another output directory, or the same settings (and input data) to resume."
            )

    def _read(self, path: Path) -> Any:
        """A stored cell, or ``_MISSING`` (no file; corrupt or, per ``valid``, incomplete: with a warning)."""
        value = _read_json(path)
        if value is not _MISSING and self.valid is not None and not self.valid(value):
            warnings.warn(f"{path} does not hold a complete cell ({str(value)[:60]}): treated as missing and "
                          "recomputed", stacklevel=3)
            return _MISSING
        return value

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def has(self, key: str) -> bool:
        """Whether a complete cell is stored (a corrupt one counts as missing, with a warning)."""
        return self._read(self.path(key)) is not _MISSING

    def get(self, key: str) -> Any:
        value = self._read(self.path(key))
        if value is _MISSING:
            raise KeyError(key)
        return value

    def put(self, key: str, value: Any) -> None:
        """Write atomically: a reader (or a resumed run) never sees half a cell."""
        write_json(self.path(key), value, sort_keys=True)

    def all(self) -> dict[str, Any]:
        """Every finished cell, by key (corrupt cells are left out, with a warning)."""
        cells = {p.stem: self._read(p) for p in sorted(self.root.glob("*.json"))}
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
        done = {k: self._read(self.path(k)) for k in todo}  # each stored cell read once
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
        if isinstance(record, dict):  # a damaged record counts as none: it only feeds the time table
            self.reused_wall_s += _seconds(record.get("wall_s"))
            self.reused_cpu_s += _seconds(record.get("cpu_s"))


def _seconds(value: Any) -> float:
    """A recorded duration, or 0 when it is missing or not a finite number >= 0."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    return float(value) if ok else 0.0
