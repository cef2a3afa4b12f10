"""Readouts and reports built on the three steps: transfer report, layer-pair search, strength.

Each takes metric callables (``metric(model) -> float``) and imports only the core modules of
:mod:`contrans_tl`; only the analyses and the CLI import this subpackage, never the core.

* :mod:`contrans_tl.reports.transfer` — held-out R², cosine and causal ratio of a mapped vector.
* :mod:`contrans_tl.reports.layer_search` — source × target layer grid, outlier filtering, auto layers.
* :mod:`contrans_tl.reports.strength` — norm-unit calibration and the KL-guarded alpha sweep.
"""

from contrans_tl.reports.layer_search import (
    LayerPairSearch,
    auto_layers,
    drop_outlier_samples,
    layer_pair_search,
    layer_pair_search_from_states,
    strided_layers,
)
from contrans_tl.reports.strength import StrengthSweep, calibrate_norms, guarded_sweep
from contrans_tl.reports.transfer import Metric, TransferReport, transfer_report

__all__ = [
    "Metric",
    "TransferReport",
    "transfer_report",
    "LayerPairSearch",
    "layer_pair_search",
    "layer_pair_search_from_states",
    "drop_outlier_samples",
    "strided_layers",
    "auto_layers",
    "StrengthSweep",
    "calibrate_norms",
    "guarded_sweep",
]
