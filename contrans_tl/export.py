"""Exports of a steering intervention to other runtimes: llama.cpp control vectors, lm-eval ``steered``.

Both formats describe the same thing :func:`~contrans_tl.transplant.transplant` does: add a fixed
vector to the residual stream after decoder block ``l`` at every position. The basis is explicit:

* contrans_tl's ``blocks.{l}.hook_resid_post`` on a TransformerLens 4 ``TransformerBridge`` in raw
  mode (how :func:`~contrans_tl.load_model` boots every model) **is** the output of the HF decoder
  layer ``model.layers[l]`` — no folded LayerNorm, no centred weights, no rescaling.
* llama.cpp adds ``direction.{k}`` to ``l_out`` of block ``k`` (0-based, after the block's last
  residual add, every position, prompt included): the same tensor as the HF decoder layer
  output, so ``direction.{l}`` carries the offset of TL layer ``l``. llama.cpp rejects
  ``direction.0``: the output of block 0 cannot be steered there, and :func:`export_gguf`
  refuses (or, with ``skip_layer0=True``, drops) it.
* lm-eval's ``steered`` model registers a forward hook on ``model.base_model.get_submodule(hookpoint)``
  and adds ``steering_coefficient * steering_vector`` to the module's output (the first element
  when it is a tuple). With hook point ``layers.{l}`` that is again the HF decoder layer output.
  These are HF module names, not TransformerLens hook names: ``blocks.{l}.hook_resid_post`` is
  not a module of an HF model and lm-eval would refuse it.

A vector made with TransformerLens 2.x ``HookedTransformer`` (``fold_ln``, ``center_writing_weights``
by default) lives in another basis: centring subtracts each vector's mean over d_model, and the
folded final LayerNorm changes what a direction does downstream. Such vectors are not valid in
these files unless the model was loaded with ``from_pretrained_no_processing``; vectors from this
library (raw bridge) are.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from contrans_tl.artifacts import ConceptVector
from contrans_tl.files import atomic_path, write_json
from contrans_tl import validate
from contrans_tl.errors import ArtifactError, InvalidArgumentError, NonFiniteError
from contrans_tl.offline import OFFLINE_MODELS
from contrans_tl.transplant import Unit, steering_offsets
from contrans_tl.handle import ModelHandle

__all__ = [
    "BASIS",
    "hf_layer_module_name",
    "steering_vectors",
    "export_gguf",
    "read_gguf",
    "export_lm_eval",
    "read_lm_eval",
]

BASIS = (
    "residual stream after decoder block l (0-based) = HF model.layers[l] output = "
    "TransformerLens 4 raw TransformerBridge blocks.{l}.hook_resid_post"
)
"""The basis string written into every export."""


def hf_layer_module_name(model: ModelHandle | None, layer: int, *, template: str = "layers.{layer}") -> str:
    """Name of decoder block ``layer`` under the HF model's ``base_model`` (lm-eval's hook points).

    With a loaded bridge the name is read off the wrapped HF model (``layers.3`` for Llama,
    Gemma 3, Qwen 2 and GPT-NeoX; ``h.3`` for GPT-2); without one ``template`` is used.
    """
    if model is not None:
        hf = getattr(model, "original_model", None)
        blocks = getattr(model, "blocks", None)
        if hf is not None and blocks is not None:
            inner = getattr(blocks[layer], "original_component", None)
            for name, module in hf.base_model.named_modules():
                if module is inner or module is blocks[layer]:
                    # the bridge wraps HF's module in place: strip its own attribute
                    return name.removesuffix("._original_component")
    return template.format(layer=layer)


def _model_hint(vector: ConceptVector, model: ModelHandle | None) -> str:
    entry = OFFLINE_MODELS.get(vector.model.name)
    if entry is not None:
        return entry.arch
    hf = getattr(model, "original_model", None) if model is not None else None
    model_type = getattr(getattr(hf, "config", None), "model_type", None)
    return str(model_type) if model_type else vector.model.name


def steering_vectors(
    vector: ConceptVector,
    *,
    alpha: float = 1.0,
    unit: Unit = "raw",
    layers: Sequence[int] | None = None,
) -> dict[int, Tensor]:
    """The offset added at each layer by ``transplant(model, vector, alpha=..., unit=..., layers=...)``.

    Exactly :func:`~contrans_tl.transplant.steering_offsets`, so an export reproduces the
    in-library intervention bit for bit (float32).
    """
    if not isinstance(vector, ConceptVector):
        raise InvalidArgumentError("vector", vector, "a ConceptVector (ConceptVector.load(path), or amap.apply(vector))")
    alpha = validate.real("alpha", alpha)
    validate.choice("unit", unit, ["raw", "norm"])
    if layers is not None:
        layers = validate.layer_list("layers", layers, vector.model.n_layers)
    offsets = steering_offsets([vector], [alpha], layers=layers, unit=unit)
    if not offsets:
        raise InvalidArgumentError("alpha", alpha, "a non-zero strength, at layers where the vector is non-zero")
    bad = [layer for layer, offset in offsets.items() if not torch.isfinite(offset.float()).all()]
    if bad:  # alpha 1e300, say: float32 offsets overflow; an engine would add inf/NaN to the residual stream
        raise NonFiniteError(f"alpha={alpha:g} ({unit} units) gives NaN or inf offsets at layer(s) {sorted(bad)}: "
                             "use a strength whose offset alpha * |v| fits in float32")
    return {layer: offsets[layer] for layer in sorted(offsets)}


def _provenance(vector: ConceptVector, alpha: float, unit: str) -> dict[str, Any]:
    return {
        "model": vector.model.name,
        "revision": vector.model.revision,
        "n_layers": vector.model.n_layers,
        "d_model": vector.model.d_model,
        "method": vector.method,
        "alpha": alpha,
        "unit": unit,
        "provenance": vector.provenance,
    }


def export_gguf(
    vector: ConceptVector,
    path: str | Path,
    *,
    alpha: float = 1.0,
    unit: Unit = "raw",
    layers: Sequence[int] | None = None,
    model: ModelHandle | None = None,
    skip_layer0: bool = False,
) -> Path:
    """Write a llama.cpp control vector (``--control-vector FILE``) reproducing the transplant.

    Tensors ``direction.{l}`` (float32, ``[d_model]``) hold the full offset ``alpha · v[l]`` (or
    its norm-unit equivalent): ``--control-vector FILE`` applies it at strength 1, and
    ``--control-vector-scaled FILE:S`` multiplies it by S. Metadata: ``general.architecture =
    controlvector``, ``controlvector.model_hint`` (llama.cpp's architecture name when known),
    ``controlvector.layer_count`` (number of directions), and ``contrans.basis`` /
    ``contrans.provenance`` (ignored by llama.cpp). Layer 0 cannot be expressed (see module doc).
    """
    import gguf

    offsets = steering_vectors(vector, alpha=alpha, unit=unit, layers=layers)
    if 0 in offsets:
        if not skip_layer0:
            raise InvalidArgumentError(
                "layers", sorted(offsets),
                "layers >= 1: llama.cpp cannot steer the output of block 0 (pass skip_layer0=True to drop it)",
            )
        warnings.warn("export_gguf: dropping layer 0, which llama.cpp cannot steer", stacklevel=2)
        del offsets[0]
    if not offsets:
        raise InvalidArgumentError("layers", [0], "at least one layer >= 1 (llama.cpp cannot steer block 0)")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        writer.add_string("controlvector.model_hint", _model_hint(vector, model))
        writer.add_uint32("controlvector.layer_count", len(offsets))
        writer.add_string("contrans.basis", BASIS)
        writer.add_string("contrans.provenance", json.dumps(_provenance(vector, alpha, unit)))
        for layer, offset in offsets.items():
            writer.add_tensor(f"direction.{layer}", offset.detach().cpu().numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def read_gguf(path: str | Path) -> tuple[dict[int, Tensor], dict[str, Any]]:
    """Directions (layer → float32 tensor) and string/int metadata of a control-vector GGUF."""
    import gguf

    if not Path(path).is_file():
        raise ArtifactError(f"{path}: no such file")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as err:
        raise ArtifactError(f"{path}: not a readable GGUF file ({err})") from err
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    if meta.get("general.architecture") != "controlvector":
        raise ArtifactError(f"{path}: architecture {meta.get('general.architecture')!r}, not a control vector")
    out: dict[int, Tensor] = {}
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            raise ArtifactError(f"{path}: unexpected tensor {t.name!r}")
        out[int(index)] = torch.from_numpy(np.array(t.data, dtype=np.float32)).reshape(-1)
    return dict(sorted(out.items())), meta


def export_lm_eval(
    vector: ConceptVector,
    path: str | Path,
    *,
    alpha: float = 1.0,
    unit: Unit = "raw",
    layers: Sequence[int] | None = None,
    model: ModelHandle | None = None,
    hookpoint_template: str = "layers.{layer}",
) -> Path:
    """Write the ``steer_path`` ``.pt`` of lm-evaluation-harness's ``steered`` model.

    ``{hookpoint: {"steering_vector": float32 [d_model], "steering_coefficient": alpha,
    "action": "add", "bias": None, "head_index": None}}`` with ``steering_coefficient ·
    steering_vector`` equal to the transplant offset: ``steering_vector`` is ``v[l]`` (raw) or
    ``v[l] / ‖v[l]‖ · mean‖resid_post[l]‖`` (norm units), so the strength can be changed in the
    file. Hook points are HF module names under ``base_model`` (read off ``model`` when given,
    else ``hookpoint_template``). Run with ``lm_eval --model steered --model_args
    pretrained=HF_ID,steer_path=FILE``; the HF model must be the same weights as ``vector.model``.

    lm-eval releases whose ``SteeredModel`` builds its hooks with a ``lambda`` inside the loop
    apply the *last* hook point's vector at every hook point; with those, export one layer per
    file (``layers=[l]``).
    """
    alpha = validate.real("alpha", alpha)
    if not isinstance(hookpoint_template, str) or "{layer}" not in hookpoint_template:
        raise InvalidArgumentError("hookpoint_template", hookpoint_template, "a string containing '{layer}'")
    steering_vectors(vector, alpha=alpha, unit=unit, layers=layers)  # the offsets the file describes: finite
    unit_vectors = steering_vectors(vector, alpha=1.0, unit=unit, layers=layers)
    config: dict[str, dict[str, Any]] = {}
    for layer, vec in unit_vectors.items():
        config[hf_layer_module_name(model, layer, template=hookpoint_template)] = {
            "steering_vector": vec.detach().cpu().float().contiguous(),
            "steering_coefficient": float(alpha),
            "action": "add",
            "bias": None,
            "head_index": None,
        }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(config, tmp)
    write_json(path.with_name(path.name + ".json"), {"basis": BASIS, "hookpoints": list(config), **_provenance(vector, alpha, unit)})
    return path


def read_lm_eval(path: str | Path) -> dict[str, dict[str, Any]]:
    """Load a steered-model ``.pt`` with ``torch.load(weights_only=True)``: plain tensors only (lm-eval
    0.4.13 loads it with ``weights_only=False``; the file loads either way)."""
    try:
        with open(path, "rb") as f:
            return torch.load(f, weights_only=True)
    except (OSError, RuntimeError) as err:
        raise ArtifactError(f"{path}: not a readable steering file ({err})") from err
