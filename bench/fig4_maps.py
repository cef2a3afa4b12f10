"""Fig 4 under two map corpora: each cell's accuracy (the runs' metric, Logit Acc by default) with the paper's
neutral map, with the concept map, and the difference with its 95 % interval.

Both runs must score the same items (same task, seed and baselines; checked). The cells keep label counts,
not per-item outcomes, so the interval is Newcombe's for two independent proportions: on the same items,
positively correlated, the paired interval would be narrower, so this one errs on the side of "no change".

    python -m bench.fig4_maps NEUTRAL/matrix.json CONCEPT/matrix.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

from contrans_tl.errors import InvalidArgumentError
from contrans_tl.metrics import pooled_hits, wilson_interval

__all__ = ["compare", "main"]


def _difference(a: tuple[int, int], b: tuple[int, int]) -> tuple[float, float, float]:
    """b − a with Newcombe's hybrid score interval (Wilson limits of each proportion combined)."""
    pa, pb = a[0] / a[1], b[0] / b[1]
    (la, ua), (lb, ub) = wilson_interval(*a), wilson_interval(*b)
    d = pb - pa
    return d, d - ((pb - lb) ** 2 + (ua - pa) ** 2) ** 0.5, d + ((ub - pb) ** 2 + (pa - la) ** 2) ** 0.5


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
            ha, hb = (pooled_hits((c[metric], c["n"]) for c in cells[key].values()) for cells in (a, b))
            if s == t:
                row.append(f"{ha[0] / ha[1]:.3f} (own vector, no map)")
                continue
            d, low, high = _difference(ha, hb)
            up, down = up + (low > 0), down + (high < 0)
            row.append(f"{ha[0] / ha[1]:.3f} → **{hb[0] / hb[1]:.3f}** ({d:+.3f} [{low:+.2f}, {high:+.2f}])")
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
