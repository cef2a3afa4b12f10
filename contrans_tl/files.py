"""The one way contrans_tl writes a file: atomically, so a reader never sees half of it.

Every writer (artifacts, paired states, exports, sweep cells, settings, result JSON) goes
through :func:`atomic_path`: the content is written to a temporary file with a unique name in
the target folder, flushed to disk, then moved over the target with ``os.replace``. Any number
of concurrent writers of one path end with one complete file from one of them, and no error.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from contrans_tl.errors import ArtifactError

__all__ = ["atomic_path", "atomic_write_text", "json_ready", "write_json"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; when the block ends cleanly, fsync it and move it onto ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. A folder that
    cannot be created or written raises :class:`ArtifactError` naming it.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:100]}.", suffix=".tmp")
    except OSError as err:
        raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:  # the target is a folder, say
            raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_ready(obj: Any) -> Any:
    """Strict-JSON form: tuples → lists, tensors → lists, paths → str, non-finite floats → None."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_ready(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = False) -> Path:
    """Write ``obj`` as strict JSON (see :func:`json_ready`) atomically."""
    return atomic_write_text(path, json.dumps(json_ready(obj), indent=1, allow_nan=False, sort_keys=sort_keys))
