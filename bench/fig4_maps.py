"""Fig 4 under two map corpora: each cell's accuracy (the runs' metric, Logit Acc by default) with the paper's
neutral map, with the concept map, and the difference with its 95 % interval.

Both runs must score the same items (same task, seed and baselines; checked). Each cell keeps its items'
outcomes, so the difference is paired on the same items (:func:`contrans_tl.metrics.paired_difference_interval`,
the items of all emotions pooled).

    python -m bench.fig4_maps NEUTRAL/matrix.json CONCEPT/matrix.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from contrans_tl.errors import InvalidArgumentError
from contrans_tl.metrics import paired_difference_interval

__all__ = ["compare", "main"]


def _outcomes(cell: dict[str, Any], metric: str, which: str) -> list[int]:
    """One cell's per-item outcomes, every emotion's items in turn (refused where a run predates them)."""
    key = metric.replace("_acc", "_hits")
    if any(key not in r for r in cell.values()):
        raise InvalidArgumentError(which, "a run without per-item outcomes", f"cells with {key!r} (rerun the size "
                                   "matrix at this version; its cells record each item's outcome)")
    return [h for e in sorted(cell) for h in cell[e][key]]


def compare(neutral: dict[str, Any], concept: dict[str, Any], alpha: str = "0.3") -> str:
    """The markdown table: rows source, columns target, each cell neutral → concept (difference [95 % CI])."""
    for key in ("models", "task", "baseline", "steering_layers", "metric"):
        if neutral.get(key) != concept.get(key):
            raise InvalidArgumentError("matrix.json", key, "two runs of the same models, items and baselines")
    a, b = neutral["matrices"][alpha]["cells"], concept["matrices"][alpha]["cells"]
    models, metric = neutral["models"], neutral["metric"]
    lines = ["| source \\ target | " + " | ".join(models) + " |", "|---" * (len(models) + 1) + "|"]
    up = down = 0
    for s in models:
        row = []
        for t in models:
            key = f"{s} -> {t}"
            ha, hb = (_outcomes(cells[key], metric, which) for cells, which in ((a, "neutral"), (b, "concept")))
            if s == t:
                row.append(f"{sum(ha) / len(ha):.3f} (own vector, no map)")
                continue
            d, low, high = paired_difference_interval(ha, hb)
            up, down = up + (low > 0), down + (high < 0)
            row.append(f"{sum(ha) / len(ha):.3f} → **{sum(hb) / len(hb):.3f}** ({d:+.3f} [{low:+.2f}, {high:+.2f}])")
        lines.append(f"| {s} | " + " | ".join(row) + " |")
    base = " | ".join(f"{neutral['baseline'][t]['mean_' + metric]:.3f}" for t in models)
    lines.append(f"| *baseline* | {base} |")
    lines.append("")
    lines.append(f"Off-diagonal cells whose interval lies above 0: {up}; below 0: {down}; of {len(models) * (len(models) - 1)}.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m bench.fig4_maps NEUTRAL/matrix.json CONCEPT/matrix.json", file=sys.stderr)
        return 2
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in args]
    print(compare(*runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
