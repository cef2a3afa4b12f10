"""ConceptVector and AffineMap: the artifacts of steps 1 and 2, with provenance.

Each saves to one ``.safetensors`` file: tensors in the body, provenance as JSON in the
header (model names and revisions, hook site, layers, corpus hash, R², library version).
Loading checks the kind and shapes; applying checks the model and raises a named error.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from contrans_tl import validate
from contrans_tl.files import atomic_path
from contrans_tl.errors import (
    ArtifactError,
    InvalidArgumentError,
    LayerIndexError,
    ModelMismatchError,
    NonFiniteError,
    WidthMismatchError,
)
from contrans_tl.models import ModelIdentity, identity
from contrans_tl.handle import ModelHandle

__all__ = ["ConceptVector", "AffineMap", "FORMAT_VERSION"]

FORMAT_VERSION = 1
"""Bumped when the on-disk layout changes; loading refuses newer versions."""


def _library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("contrans_tl")
    except PackageNotFoundError:  # running from a source tree
        return "unknown"


def _write(path: str | Path, kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    path = Path(path)
    header = {"kind": kind, "format": FORMAT_VERSION, "library": _library_version(), **meta}
    with atomic_path(path) as tmp:  # a reader never sees half a file
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(tmp),
            metadata={"contrans_tl": json.dumps(header)},
        )
    return path


def _read(path: str | Path, kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: no such artifact file")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header["contrans_tl"])
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{path}: not a readable contrans_tl artifact ({err})") from err
    if meta.get("kind") != kind:
        raise ArtifactError(f"{path}: holds a {meta.get('kind')!r}, expected a {kind!r}")
    if int(meta.get("format", 0)) > FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {meta['format']} is newer than this library reads")
    return tensors, meta


def _header_int(meta: dict[str, Any], key: str, path: str | Path) -> int:
    """An integer field of a header (a JSON int, not a bool, a float or a string like "many")."""
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArtifactError(f"{path}: header field {key}={value!r} is not an integer")
    return value


def _header_identity(meta: dict[str, Any], key: str, path: str | Path) -> ModelIdentity:
    """A model identity from a header: name and revision strings, layer count and width positive ints."""
    raw = meta[key]
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: header field {key} is not a model record")
    ident = ModelIdentity(**raw)
    for field_name in ("n_layers", "d_model"):
        if _header_int(raw, field_name, path) < 1:
            raise ArtifactError(f"{path}: header field {key}.{field_name}={raw[field_name]!r} is not a positive integer")
    if not isinstance(ident.name, str) or not (ident.revision is None or isinstance(ident.revision, str)):
        raise ArtifactError(f"{path}: header field {key} has a mistyped name or revision")
    return ident


def _header_layers(meta: dict[str, Any], key: str, path: str | Path) -> tuple[int, ...]:
    """A list of block indices from a header (ints; the range is checked against the model later)."""
    value = meta[key]
    if not isinstance(value, list) or any(isinstance(x, bool) or not isinstance(x, int) for x in value):
        raise ArtifactError(f"{path}: header field {key}={value!r} is not a list of integers")
    return tuple(value)


def _identity_dict(ident: ModelIdentity) -> dict[str, Any]:
    return dataclasses.asdict(ident)


def _check_model(expected: ModelIdentity, model: ModelHandle, what: str) -> None:
    actual = identity(model)
    if actual.d_model != expected.d_model:
        raise WidthMismatchError(
            f"{what} has width {expected.d_model} but the model's d_model is {actual.d_model} "
            f"({expected.name} vs {actual.name})"
        )
    if (actual.name, actual.revision, actual.n_layers) != (
        expected.name,
        expected.revision,
        expected.n_layers,
    ):
        raise ModelMismatchError(
            f"{what} was made for {expected.name} (revision {expected.revision}, "
            f"{expected.n_layers} layers) but is applied to {actual.name} (revision "
            f"{actual.revision}, {actual.n_layers} layers); pass check_model=False only if "
            "they are the same weights under another name"
        )


@dataclass(frozen=True)
class ConceptVector:
    """One concept direction per layer of one model's residual stream (resid_post)."""

    vectors: Float[Tensor, "layer d_model"]
    """The direction at every layer; rows outside ``layers`` are zero."""
    model: ModelIdentity
    """The model whose residual stream the vectors live in."""
    layers: tuple[int, ...]
    """Layers that carry the concept (all layers for a refined vector)."""
    method: str
    """How the vector was made: "mean_diff", "pca", "mapped", "random", "combination"."""
    layer_norms: Float[Tensor, "layer"] | None = None
    """Mean resid_post norm of the model per layer, the unit for alpha in norm units."""
    hook: str = "resid_post"
    position: str = "last"
    n_prompts: int = 0
    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form record: for mapped vectors the source, layer pairs, corpus hash and R²."""

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, Tensor):
            raise InvalidArgumentError("vectors", type(self.vectors).__name__, "a [layer, d_model] float tensor")
        if not isinstance(self.model, ModelIdentity):
            raise InvalidArgumentError("model", self.model, "a ModelIdentity (contrans_tl.identity(model))")
        v = self.vectors
        if v.ndim != 2 or v.shape != (self.model.n_layers, self.model.d_model):
            raise WidthMismatchError(
                f"vectors of shape {tuple(v.shape)} do not fit {self.model.name} "
                f"({self.model.n_layers} layers x {self.model.d_model})"
            )
        if not torch.isfinite(v).all():
            raise NonFiniteError(f"concept vector for {self.model.name} has NaN or inf entries")
        validate.layer_list("layers", self.layers, self.model.n_layers)
        if self.layer_norms is not None and (
            not isinstance(self.layer_norms, Tensor) or tuple(self.layer_norms.shape) != (self.model.n_layers,)
        ):
            raise InvalidArgumentError("layer_norms", self.layer_norms, f"None or a [{self.model.n_layers}] tensor")
        if self.layer_norms is not None and not torch.isfinite(self.layer_norms).all():
            raise NonFiniteError(f"concept vector for {self.model.name} has NaN or inf layer_norms (alpha's norm unit)")

    @property
    def d_model(self) -> int:
        return self.model.d_model

    def check_model(self, model: ModelHandle) -> None:
        """Raise ModelMismatchError / WidthMismatchError unless made for ``model``."""
        _check_model(self.model, model, "this concept vector")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "ConceptVector":
        """A copy with tensors moved/cast."""
        norms = None if self.layer_norms is None else self.layer_norms.to(device=device, dtype=dtype)
        return dataclasses.replace(self, vectors=self.vectors.to(device=device, dtype=dtype), layer_norms=norms)

    def restrict(self, layers: Sequence[int]) -> "ConceptVector":
        """The same vector with every layer outside ``layers`` zeroed."""
        keep = sorted(validate.layer_list("layers", layers, self.model.n_layers))
        mask = torch.zeros(self.model.n_layers, 1, dtype=self.vectors.dtype)
        mask[keep] = 1
        return dataclasses.replace(self, vectors=self.vectors * mask, layers=tuple(keep))

    # ---- algebra: superpositions read as 0.6 * joy + 0.4 * honesty ----
    def _combine(self, other: "ConceptVector", sign: float) -> "ConceptVector":
        if not isinstance(other, ConceptVector):
            return NotImplemented
        if other.model != self.model:
            raise ModelMismatchError(
                f"cannot combine vectors of {self.model.name} and {other.model.name}"
            )
        return dataclasses.replace(
            self,
            vectors=self.vectors + sign * other.vectors,
            layers=tuple(sorted(set(self.layers) | set(other.layers))),
            method="combination",
            n_prompts=self.n_prompts + other.n_prompts,
            provenance={"parts": [self.method, other.method]},
        )

    def __add__(self, other: "ConceptVector") -> "ConceptVector":
        return self._combine(other, 1.0)

    def __sub__(self, other: "ConceptVector") -> "ConceptVector":
        return self._combine(other, -1.0)

    def __mul__(self, scale: float) -> "ConceptVector":
        return dataclasses.replace(self, vectors=self.vectors * validate.real("scale", scale))

    __rmul__ = __mul__

    def __truediv__(self, scale: float) -> "ConceptVector":
        divisor = validate.real("scale", scale)
        if divisor == 0:
            raise InvalidArgumentError("scale", scale, "a non-zero number to divide by")
        return dataclasses.replace(self, vectors=self.vectors / divisor)

    def __neg__(self) -> "ConceptVector":
        return self * -1.0

    # ---- persistence ----
    def save(self, path: str | Path) -> Path:
        tensors = {"vectors": self.vectors.float()}
        if self.layer_norms is not None:
            tensors["layer_norms"] = self.layer_norms.float()
        meta = {
            "model": _identity_dict(self.model),
            "layers": list(self.layers),
            "method": self.method,
            "hook": self.hook,
            "position": self.position,
            "n_prompts": self.n_prompts,
            "provenance": self.provenance,
        }
        return _write(path, "concept_vector", tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptVector":
        tensors, meta = _read(path, "concept_vector")
        try:
            return cls(
                vectors=tensors["vectors"],
                model=_header_identity(meta, "model", path),
                layers=_header_layers(meta, "layers", path),
                method=meta["method"],
                layer_norms=tensors.get("layer_norms"),
                hook=meta["hook"],
                position=meta["position"],
                n_prompts=_header_int(meta, "n_prompts", path),
                provenance=meta.get("provenance", {}),
            )
        except (KeyError, TypeError, InvalidArgumentError) as err:
            raise ArtifactError(f"{path}: incomplete or mistyped concept vector metadata ({err})") from err


@dataclass(frozen=True)
class AffineMap:
    """Per layer pair, an affine map from source resid_post to target resid_post: y ≈ x W + b."""

    weight: Float[Tensor, "pair d_src d_tgt"]
    bias: Float[Tensor, "pair d_tgt"]
    source: ModelIdentity
    target: ModelIdentity
    source_layers: tuple[int, ...]
    target_layers: tuple[int, ...]
    r2_heldout: Float[Tensor, "pair"]
    """Variance-weighted R² on held-out texts (never seen by the solver or the ridge search)."""
    r2_train: Float[Tensor, "pair"]
    ridge: Float[Tensor, "pair"]
    """The ridge strength used per pair (0 is plain minimum-norm least squares)."""
    target_norms: Float[Tensor, "layer"] | None = None
    """The target's mean resid_post norm per layer on the corpus (for alpha in norm units)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Corpus hash, sample counts, alignment scheme."""

    def __post_init__(self) -> None:
        n_pairs = len(self.target_layers)
        expected = (n_pairs, self.source.d_model, self.target.d_model)
        if len(self.source_layers) != n_pairs or tuple(self.weight.shape) != expected:
            raise WidthMismatchError(
                f"map weight of shape {tuple(self.weight.shape)} does not fit {n_pairs} pairs "
                f"from width {self.source.d_model} to {self.target.d_model}"
            )
        if not (torch.isfinite(self.weight).all() and torch.isfinite(self.bias).all()):
            raise NonFiniteError("affine map has NaN or inf entries")
        for side, layers, ident in (("source_layers", self.source_layers, self.source),
                                    ("target_layers", self.target_layers, self.target)):
            bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int)
                   or not 0 <= layer < ident.n_layers]
            if bad:
                raise LayerIndexError(f"{side}: layer(s) {bad} out of range: {ident.name} has {ident.n_layers} "
                                      f"blocks (0..{ident.n_layers - 1})")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """(source layer, target layer) pairs in order."""
        return list(zip(self.source_layers, self.target_layers))

    def apply(self, vector: ConceptVector, *, check_model: bool = True) -> ConceptVector:
        """Push a source concept vector into the target's space: v̂[t] = v[s] W.

        Only the linear part applies: a concept vector is a difference of means, and the
        bias cancels in ``mean(X W + b) - mean(X' W + b)``.
        """
        if not isinstance(vector, ConceptVector):
            raise InvalidArgumentError("vector", vector, "a ConceptVector of the map's source model")
        if vector.d_model != self.source.d_model:
            raise WidthMismatchError(
                f"vector width {vector.d_model} differs from the map's source width {self.source.d_model}"
            )
        if check_model and vector.model != self.source:
            raise ModelMismatchError(
                f"this map was fitted from {self.source.name} but the vector belongs to {vector.model.name}"
            )
        src = vector.vectors[list(self.source_layers)].to(torch.float64)
        mapped = torch.einsum("ps,pst->pt", src, self.weight.to(torch.float64)).float()
        out = torch.zeros(self.target.n_layers, self.target.d_model)
        out[list(self.target_layers)] = mapped
        return ConceptVector(
            vectors=out,
            model=self.target,
            layers=tuple(self.target_layers),
            method="mapped",
            layer_norms=self.target_norms,
            hook=vector.hook,
            position=vector.position,
            n_prompts=vector.n_prompts,
            provenance={
                "source": _identity_dict(self.source),
                "source_method": vector.method,
                "pairs": self.pairs,
                "r2_heldout": [round(float(r), 6) for r in self.r2_heldout],
                **{k: v for k, v in self.provenance.items() if k in ("corpus_hash", "alignment", "estimator", "corpus")},
            },
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "AffineMap":
        """A copy with the weight and bias moved/cast."""
        return dataclasses.replace(
            self,
            weight=self.weight.to(device=device, dtype=dtype),
            bias=self.bias.to(device=device, dtype=dtype),
        )

    def save(self, path: str | Path) -> Path:
        tensors = {
            "weight": self.weight.float(),
            "bias": self.bias.float(),
            "r2_heldout": self.r2_heldout.float(),
            "r2_train": self.r2_train.float(),
            "ridge": self.ridge.double(),
        }
        if self.target_norms is not None:
            tensors["target_norms"] = self.target_norms.float()
        meta = {
            "source": _identity_dict(self.source),
            "target": _identity_dict(self.target),
            "source_layers": list(self.source_layers),
            "target_layers": list(self.target_layers),
            "provenance": self.provenance,
        }
        return _write(path, "affine_map", tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "AffineMap":
        tensors, meta = _read(path, "affine_map")
        try:
            return cls(
                weight=tensors["weight"],
                bias=tensors["bias"],
                source=_header_identity(meta, "source", path),
                target=_header_identity(meta, "target", path),
                source_layers=_header_layers(meta, "source_layers", path),
                target_layers=_header_layers(meta, "target_layers", path),
                r2_heldout=tensors["r2_heldout"],
                r2_train=tensors["r2_train"],
                ridge=tensors["ridge"],
                target_norms=tensors.get("target_norms"),
                provenance=meta.get("provenance", {}),
            )
        except (KeyError, TypeError, InvalidArgumentError) as err:
            raise ArtifactError(f"{path}: incomplete or mistyped affine map metadata ({err})") from err
