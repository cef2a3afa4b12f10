"""Checkpoints of the checkpoint sweep (naming, training position) and the executors cells run on.

Checkpoints are named as :func:`contrans_tl.load_model` takes them (:func:`resolve_checkpoint`):

* ``ckpt_000`` … ``ckpt_359`` — hub revisions (branches) of ``LLM360/Amber``, loaded with
  ``revision=``; any other non-``step`` name is a revision too.
* ``step1000`` — a Pythia training step, loaded with ``checkpoint=1000`` through
  TransformerLens's checkpoint helpers.
* a local directory — any HF checkpoint directory (the test trains a tiny model and saves a
  few with :func:`make_tiny_checkpoints`).

:func:`training_tokens` tells how far into training each is. Cells of the sweep and of the
size matrix run on the ``concurrent.futures.Executor`` of :func:`cell_executor`: a local
``ProcessPoolExecutor`` (spawn start method), this process, or the caller's — a
``submitit.AutoExecutor`` for SLURM (wrapped in :class:`JobExecutor`), a Dask
``distributed.Client.get_executor()``, Ray through :class:`RayExecutor`. Such cells must see the
run's ``out`` directory (a shared file system): they read the saved vectors from it.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import ArtifactError, InvalidArgumentError
from contrans_tl.files import write_json

__all__ = [
    "PYTHIA_TOKENS_PER_STEP",
    "AMBER_TOTAL_TOKENS",
    "AMBER_CHECKPOINTS",
    "resolve_checkpoint",
    "training_tokens",
    "JobExecutor",
    "RayExecutor",
    "cell_executor",
    "check_checkpoint",
    "looks_like_folder",
    "make_tiny_checkpoints",
]

T = TypeVar("T")

PYTHIA_TOKENS_PER_STEP = 2_097_152
"""Pythia: 1024 sequences of 2048 tokens per optimizer step."""
AMBER_TOTAL_TOKENS = 1_259_130_000_000
AMBER_CHECKPOINTS = 360
"""Amber: 1.259T tokens in 360 equal data chunks; ``ckpt_k`` has seen about k+1 of them."""


def looks_like_folder(spec: str) -> bool:
    """Whether a checkpoint spec names a local folder: it starts with ``/``, ``.`` or ``~`` or holds a
    path separator (hub revisions used as checkpoints, ``ckpt_100`` or ``step1000``, hold none)."""
    return spec.startswith(("/", ".", "~")) or "/" in spec or os.sep in spec


def check_checkpoint(name: str, spec: Any) -> str:
    """``spec`` if it is a usable checkpoint spec; a folder-like one must be an existing folder.

    Without this a missing folder would be read as a hub revision of the final model.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise InvalidArgumentError(name, spec, "a checkpoint: ckpt_000 (revision), step1000 (Pythia) or a folder")
    if looks_like_folder(spec) and not Path(spec).expanduser().is_dir():
        raise InvalidArgumentError(name, spec, "an existing checkpoint folder (no such folder)")
    return spec


def resolve_checkpoint(model: str, spec: str) -> tuple[str, dict[str, Any]]:
    """(name or path, load_model keyword arguments) for one checkpoint spec."""
    check_checkpoint("checkpoint", spec)
    if Path(spec).expanduser().is_dir():
        return str(spec), {}
    step = re.fullmatch(r"step(\d+)", spec)
    if step:
        return model, {"checkpoint": int(step.group(1))}
    return model, {"revision": spec}


def training_tokens(spec: str, *, tokens_per_step: float | None = None) -> float | None:
    """Tokens seen at a checkpoint, when it can be told (None otherwise).

    Local directories: ``trainer_state.json`` (``num_input_tokens_seen``, else ``global_step`` ×
    ``tokens_per_step``). ``stepN``: N × ``tokens_per_step`` (Pythia's by default).
    ``ckpt_k`` (Amber): (k + 1) / 360 × 1.259T, an estimate from equal data chunks.
    """
    per_step = float(tokens_per_step or PYTHIA_TOKENS_PER_STEP)
    path = Path(spec)
    if path.is_dir():
        state = path / "trainer_state.json"
        if state.is_file():
            data = _trainer_state(state)
            if data.get("num_input_tokens_seen"):
                return float(data["num_input_tokens_seen"])
            if data.get("global_step") is not None and tokens_per_step:
                return float(data["global_step"]) * per_step
        return None
    step = re.fullmatch(r"step(\d+)", spec)
    if step:
        return int(step.group(1)) * per_step
    amber = re.fullmatch(r"ckpt_(\d+)", spec)
    if amber:
        return (int(amber.group(1)) + 1) / AMBER_CHECKPOINTS * AMBER_TOTAL_TOKENS
    return None


def _trainer_state(path: Path) -> dict[str, Any]:
    """The JSON object of a ``trainer_state.json``; a cut-short or wrong-shaped one is a named error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{path}: not readable JSON ({err}); rewrite it or delete it") from None
    ok = isinstance(data, dict) and all(
        data.get(k) is None or (isinstance(data[k], (int, float)) and not isinstance(data[k], bool))
        for k in ("num_input_tokens_seen", "global_step"))
    if not ok:
        raise ArtifactError(f"{path}: expected a JSON object with numeric num_input_tokens_seen / global_step")
    return data


class JobExecutor(Executor):
    """A ``concurrent.futures.Executor`` over an executor whose ``submit`` returns job handles.

    submitit's ``AutoExecutor`` (SLURM) returns ``Job`` objects, not ``concurrent.futures.Future``,
    so ``as_completed`` cannot wait on them. This adapter submits through the inner executor and
    returns a real Future per job, resolved by a waiting thread calling the job's blocking
    ``result()``. :func:`cell_executor` wraps such executors automatically.
    """

    def __init__(self, inner: Any, *, max_waiters: int = 32) -> None:
        self.inner = inner
        self._waiters = ThreadPoolExecutor(max_workers=max_waiters, thread_name_prefix="job-wait")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        job = self.inner.submit(fn, *args, **kwargs)
        return self._waiters.submit(job.result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._waiters.shutdown(wait=wait, cancel_futures=cancel_futures)


class RayExecutor(Executor):
    """A ``concurrent.futures.Executor`` over Ray tasks (Ray has none of its own).

    ``submit`` runs ``fn`` as a Ray task with the ``ray.remote`` ``options`` given here
    (``num_gpus=1``, ``num_cpus=4``, ...) and returns the task's ``ObjectRef.future()``, a
    ``concurrent.futures.Future``. Connect first (``ray.init(...)``); shutting this executor down
    leaves Ray running (the caller owns the cluster).
    """

    def __init__(self, **options: Any) -> None:
        self.options = options
        self._remote: dict[Any, Any] = {}  # fn -> its ray remote function, exported once

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        import ray

        if fn not in self._remote:
            self._remote[fn] = ray.remote(**self.options)(fn) if self.options else ray.remote(fn)
        return self._remote[fn].remote(*args, **kwargs).future()


def _init_worker(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


@contextmanager
def cell_executor(
    executor: Any, kind: str = "serial", *, max_workers: int = 1, threads: int | None = None, needed: bool = True
) -> Iterator[tuple[Executor | None, str]]:
    """(executor to run the cells on or None for this process, its name for the run's JSON).

    ``executor`` (the caller's, not shut down here) wins over ``kind``; one whose ``submit``
    returns job handles is wrapped in a :class:`JobExecutor`. ``kind="process"`` starts a local
    spawn-context process pool, only when cells are ``needed``, and shuts it down at the end.
    """
    owned: ProcessPoolExecutor | None = None
    adapter: JobExecutor | None = None
    if executor is not None and not isinstance(executor, Executor):
        adapter = executor = JobExecutor(executor)
    if executor is None and kind == "process" and needed:
        import multiprocessing

        owned = executor = ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"),
                                               initializer=_init_worker, initargs=(threads,))
    shown = executor.inner if isinstance(executor, JobExecutor) else executor
    try:
        yield executor, type(shown).__name__ if shown is not None else "serial (this process)"
    finally:
        if owned is not None:
            owned.shutdown(wait=True, cancel_futures=True)
        if adapter is not None:
            adapter.shutdown(wait=False, cancel_futures=True)


def make_tiny_checkpoints(root: str | Path, *, steps: Sequence[int] = (1, 2, 4), lr: float = 0.05,
                          seed: int = 0) -> list[Path]:
    """Train a tiny random llama with SGD on the neutral text, saving an HF directory at ``steps``.

    Each directory has a ``trainer_state.json`` (``global_step``, ``num_input_tokens_seen``), as
    the HF Trainer writes, so :func:`training_tokens` reads its position in training.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from contrans_tl.testing import make_tiny_model_dir

    root = Path(root)
    init = make_tiny_model_dir(root / "init", "llama", seed=seed, n_ctx=1024)
    tok = AutoTokenizer.from_pretrained(init)
    model = AutoModelForCausalLM.from_pretrained(init)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    texts = neutral_sentences()
    seen, out = 0, []
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, max(steps) + 1):
        batch = [texts[int(i)] for i in torch.randint(len(texts), (8,), generator=gen)]
        enc = tok(batch, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += int(enc["attention_mask"].sum())
        if step in steps:
            path = root / f"step{step}"
            model.save_pretrained(path)
            tok.save_pretrained(path)
            write_json(path / "trainer_state.json", {"global_step": step, "num_input_tokens_seen": seen,
                                                     "loss": loss.item()})
            out.append(path)
    return out
