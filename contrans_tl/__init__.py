"""contrans_tl — concept transplantation (ConTrans) on TransformerLens 4.

The paper's three steps, one verb each:

1. :func:`refine`      contrast prompts → :class:`ConceptVector` in the source model
2. :func:`fit_map`     aligned corpus → :class:`AffineMap`; ``amap.apply(vector)`` → target space
3. :func:`transplant`  context manager adding ``alpha * v_hat`` to the target's resid_post
"""

from contrans_tl.pairing import PairedStates, capture_paired
from contrans_tl.artifacts import AffineMap, ConceptVector
from contrans_tl.capture import capture, capture_at, next_token_logits
from contrans_tl.corpus import MapCorpus, resolve_corpus
from contrans_tl.errors import (
    ArtifactError,
    ContransError,
    DataFormatError,
    DataUnavailableError,
    EmptyPromptsError,
    InvalidArgumentError,
    LabelTokenError,
    LayerIndexError,
    ModelMismatchError,
    ModelUnavailableError,
    NonFiniteError,
    PromptTooLongError,
    SettingsMismatchError,
    WidthMismatchError,
)
from contrans_tl.models import ModelIdentity, identity, load_model
from contrans_tl.offline import OFFLINE_MODELS, list_models
from contrans_tl.refine import concept_from_states, mean_difference, pca_difference, refine
from contrans_tl.reformulate import default_layer_pairs, fit_map, fit_map_from_states
from contrans_tl.transplant import generate, transplant

__version__ = "0.1.0"

__all__ = [
    "AffineMap",
    "PairedStates",
    "ArtifactError",
    "ConceptVector",
    "ContransError",
    "DataFormatError",
    "DataUnavailableError",
    "EmptyPromptsError",
    "InvalidArgumentError",
    "LabelTokenError",
    "LayerIndexError",
    "MapCorpus",
    "ModelIdentity",
    "ModelMismatchError",
    "ModelUnavailableError",
    "NonFiniteError",
    "OFFLINE_MODELS",
    "PromptTooLongError",
    "SettingsMismatchError",
    "WidthMismatchError",
    "capture",
    "concept_from_states",
    "capture_paired",
    "capture_at",
    "default_layer_pairs",
    "fit_map",
    "fit_map_from_states",
    "generate",
    "identity",
    "list_models",
    "load_model",
    "mean_difference",
    "next_token_logits",
    "pca_difference",
    "refine",
    "resolve_corpus",
    "transplant",
]
