"""The one model loader: hub names, local directories, GGUF files and built-in offline models.

Everything ends in ``TransformerBridge.boot_transformers`` in raw mode (activations equal the
HF model's; ``blocks.{l}.hook_resid_post`` is the HF decoder layer's output). GGUF files and the
built-in models load from the float32 checkpoint :mod:`contrans_tl.offline` converts them to once.
"""

from __future__ import annotations

import ctypes
import gc
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError, ModelUnavailableError
from contrans_tl.handle import ModelHandle
from contrans_tl.offline import OFFLINE_MODELS, gguf_checkpoint, offline_checkpoint

__all__ = ["ModelIdentity", "identity", "load_model"]

# --------------------------------------------------------------------------------------------
# Identity of a loaded model, recorded by artifacts and checked when they are applied.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """What an artifact records about the model it was made from."""

    name: str
    revision: str | None
    n_layers: int
    d_model: int


_IDENTITIES: "weakref.WeakKeyDictionary[ModelHandle, ModelIdentity]" = (
    weakref.WeakKeyDictionary()
)


def identity(model: ModelHandle) -> ModelIdentity:
    """The identity that :func:`load_model` gave ``model`` (or one read off its config)."""
    known = _IDENTITIES.get(model)
    if known is not None:
        return known
    cfg = model.cfg
    return ModelIdentity(str(cfg.model_name), None, int(cfg.n_layers), int(cfg.d_model))


def _register(model: ModelHandle, name: str, revision: str | None) -> None:
    cfg = model.cfg
    _IDENTITIES[model] = ModelIdentity(name, revision, int(cfg.n_layers), int(cfg.d_model))


def _check_load_args(
    name_or_path: object, revision: object, checkpoint: object, checkpoint_index: object, device: object = None
) -> str:
    """The model name as a string, after checking the arguments' types and combinations."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise InvalidArgumentError("name_or_path", name_or_path,
                                   "a built-in model name, a hub id, a local checkpoint folder or a .gguf file")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise InvalidArgumentError("revision", revision, "None or a hub branch/tag/commit name")
    validate.device("device", device)
    for arg, value in (("checkpoint", checkpoint), ("checkpoint_index", checkpoint_index)):
        if value is not None:
            validate.integer(arg, value, low=0)
    if sum(x is not None for x in (revision, checkpoint, checkpoint_index)) > 1:
        raise InvalidArgumentError("revision/checkpoint/checkpoint_index", (revision, checkpoint, checkpoint_index),
                                   "at most one of them: each names a training checkpoint")
    return str(name_or_path)


def _looks_local(name: str) -> bool:
    """A path, not a hub id (ORG/NAME): absolute, relative with ./ or ~, or more than one slash."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_checkpoint_dir(path: Path) -> None:
    """A local folder must hold a Hugging Face checkpoint (config.json and weights)."""
    if not (path / "config.json").is_file():
        raise ModelUnavailableError(
            f"{path} holds no Hugging Face checkpoint (no config.json): pass a folder written by "
            "save_pretrained, a .gguf file, a built-in name (`contrans models`) or a hub id"
        )


def _checkpoint_revision(name: str, checkpoint: int | None, checkpoint_index: int | None) -> str:
    """The hub revision of a training checkpoint (``step1000`` for Pythia), resolved as TransformerLens does.

    It is the model's recorded revision, so ``checkpoint=4``, ``checkpoint_index=3`` and
    ``revision="step4"`` of one Pythia model are one model to the artifacts.
    """
    from transformer_lens.model_bridge.sources.transformers.helpers import _resolve_checkpoint_to_revision
    from transformer_lens.tools.model_registry.registry_io import resolve_model_alias

    try:
        return _resolve_checkpoint_to_revision(resolve_model_alias(name) or name, checkpoint_index, checkpoint)
    except ValueError as err:
        arg, value = ("checkpoint", checkpoint) if checkpoint is not None else ("checkpoint_index", checkpoint_index)
        raise InvalidArgumentError(arg, value, f"a training checkpoint of a checkpointed hub family ({err})") from err


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    checkpoint: int | None = None,
    checkpoint_index: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    device_map: str | dict[str, str | int] | None = None,
) -> ModelHandle:
    """Load a model as a TransformerLens ``TransformerBridge`` in raw (HF-equivalent) mode.

    ``name_or_path`` is one of: a built-in offline name (:data:`OFFLINE_MODELS`), a ``.gguf``
    file, a local HF checkpoint directory, or a hub id as TransformerLens takes it.
    ``revision`` selects a hub branch (``LLM360/Amber`` with ``revision="ckpt_100"``);
    ``checkpoint`` is a training step value and ``checkpoint_index`` an index into the
    family's checkpoints (Pythia) through TransformerLens's checkpoint helpers; the model's
    :func:`identity` records the revision they resolve to (``step1000``).
    ``dtype`` defaults to float32; ``device_map`` passes through to HF for multi-GPU targets.
    """
    from transformer_lens.model_bridge import TransformerBridge

    name = _check_load_args(name_or_path, revision, checkpoint, checkpoint_index, device)
    dtype = torch.float32 if dtype is None else dtype
    if device is None and device_map is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    offline = OFFLINE_MODELS.get(name)
    if offline is not None:
        source = str(offline_checkpoint(offline))
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelUnavailableError(f"GGUF file {name} does not exist")
        source = str(gguf_checkpoint(Path(name)))
        name = str(Path(name).resolve())  # one identity however the path is spelled
    else:
        source = name
    is_local = Path(source).is_dir()
    if is_local and offline is None and not name.endswith(".gguf"):
        _check_checkpoint_dir(Path(source))
        name = str(Path(source).resolve())
    elif not is_local and _looks_local(name):
        raise ModelUnavailableError(f"no such local model folder: {name} (a hub id looks like ORG/NAME)")
    if (checkpoint is not None or checkpoint_index is not None) and is_local:
        raise ModelUnavailableError(
            f"{name} is a local checkpoint: training checkpoints apply to hub families only"
        )
    if revision is not None and is_local:  # a folder has one set of weights: loading it would ignore the revision
        raise ModelUnavailableError(
            f"{name} is a local model: it has no revision {revision!r} (revisions are hub branches; "
            "pass the checkpoint's own folder instead)"
        )
    wanted = revision
    if checkpoint is not None or checkpoint_index is not None:
        wanted = _checkpoint_revision(name, checkpoint, checkpoint_index)
    try:
        bridge = TransformerBridge.boot_transformers(
            source,
            device=None if device_map is not None else device,
            dtype=dtype,
            revision=revision,
            checkpoint_value=checkpoint,
            checkpoint_index=checkpoint_index,
            device_map=device_map,
        )
    except OSError as err:
        if is_local:
            raise
        raise ModelUnavailableError(
            f"could not load {name!r} (revision {wanted!r}) from the Hugging Face Hub: {err}. "
            "If the hub is unreachable, download the model where it is reachable "
            "(`huggingface-cli download NAME --revision REV --local-dir DIR`) and pass DIR, "
            "or set HF_HUB_OFFLINE=1 with a populated HF cache."
        ) from err
    bridge.eval()
    _release_load_memory(bridge)
    _register(bridge, name, wanted)
    return bridge


def _release_load_memory(model: ModelHandle) -> None:
    """Give back what loading left behind, so a loaded model costs about its weights.

    The weights themselves are the safetensors file memory-mapped (no copy). What remained was
    the tokenizer's Python-side copy of its vocabulary and merges (transformers' Gemma and Llama
    tokenizers keep the dict and list they built the Rust tokenizer from: ~200 MB for Gemma's
    262k vocabulary; nothing reads them after ``__init__``) and the heap freed by parsing
    ``tokenizer.json``, which glibc keeps until asked to return it.
    """
    tokenizer = getattr(model, "tokenizer", None)
    for attr in ("_vocab", "_merges"):
        if isinstance(getattr(tokenizer, attr, None), (dict, list)):
            setattr(tokenizer, attr, None)
    gc.collect()
    _trim_heap()


def _trim_heap() -> None:
    """``malloc_trim(0)``: return freed heap pages to the OS (glibc only; elsewhere nothing)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
