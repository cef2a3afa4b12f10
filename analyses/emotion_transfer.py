"""The paper's emotion transplantation (§4, Fig 2a/2b, Fig 5, Fig 7/8) for any source → target pair.

Refine one vector per emotion in the source, reformulate it through an affine map fitted on
neutral text, transplant it into the target at one layer and measure how often the target
answers the transplanted emotion on scenarios of the *other* emotions (negatives), with the
few-shot evaluation prompt. Controls: alpha = 0 (baseline), random vectors of the same
per-layer norm (several seeds), and the target's own natively refined vector (skyline).
The transplant layer and alpha are chosen on the refinement half, never on evaluation data.

    python -m contrans_tl.analyses.emotion_transfer --out out/emotion            # the default offline pair
    python -m contrans_tl.analyses.emotion_transfer --quick --out out/quick      # a smoke run
    python -m contrans_tl.analyses.emotion_transfer --source mistralai/Mistral-7B-Instruct-v0.2 \\
        --target meta-llama/Llama-2-13b-hf --out out/mistral-llama   # hub models
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["EmotionConfig", "run", "plot", "main", "add_args", "cli_run"]


@dataclass
class EmotionConfig:
    """Settings of one emotion-transfer run (each field is a command-line flag)."""

    source: str = "smollm2-135m-instruct"
    """Source model (aligned/instruct): built-in offline name, hub id, local dir or .gguf."""
    target: str = "gemma-3-270m"
    """Target model (the one that receives the concept)."""
    out: str = "out/emotion"
    """Output directory: results.json, summary.md, figures/, artifacts/, cells/ (resumable)."""
    data_dir: str | None = None
    """Directory of {emotion}.json scenario lists (default: the built-in set)."""
    emotions: tuple[str, ...] = ("happiness", "sadness", "anger", "fear", "disgust", "surprise")
    alphas: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    """Strength grid (includes 0, the baseline), in ``unit``s."""
    unit: str = "norm"
    """"norm": alpha is a fraction of the target layer's mean residual norm; "raw": alpha·v."""
    layers: tuple[int, ...] | None = None
    """Target layer(s) to transplant into; None chooses one on the refinement half."""
    candidate_depths: tuple[float, ...] = (0.5, 0.67, 0.83, 0.9)
    """Relative depths of the target layers tried when ``layers`` is None."""
    n_negatives: int = 10
    """Evaluation scenarios per *other* emotion (negatives of emotion e: 5 × this many)."""
    n_positives: int = 20
    """Evaluation scenarios of the emotion itself."""
    n_refine: int = 0
    """Refinement scenarios per side for the main vectors (0 = the whole refinement half)."""
    n_validation: int = 3
    """Refinement-half scenarios per other emotion used to choose layer and alpha."""
    n_examples: tuple[int, ...] = (10, 20, 50, 0)
    """Refinement sizes for Fig 5 (0 = all available; sizes above the half are capped)."""
    random_seeds: int = 3
    """Random control vectors per emotion (same per-layer norm as the mapped vector), all at the
    chosen alpha; one of them also at every other alpha (the control line of Fig 2a)."""
    n_alignment: int = 400
    """Neutral sentences used to fit the affine map."""
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    quick: bool = False
    """Smoke-test sizes: 2 alphas, 2 candidate layers, few scenarios, 1 random seed."""
    extra: dict[str, Any] = field(default_factory=dict)

    def effective(self) -> "EmotionConfig":
        """The config with ``quick`` applied."""
        if not self.quick:
            return self
        return EmotionConfig(
            **{
                **asdict(self),
                "alphas": (0.0, 0.3),
                "candidate_depths": (0.67, 0.9),
                "n_negatives": 2,
                "n_positives": 4,
                "n_validation": 1,
                "n_refine": 8,
                "n_examples": (5, 0),
                "random_seeds": 1,
                "n_alignment": 120,
                "quick": True,
            }
        )


def _log(msg: str) -> None:
    print(f"[emotion {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cfg: EmotionConfig) -> dict[str, Any]:
    """Run the whole experiment; finished pieces are kept under ``cfg.out`` and reused."""
    import torch

    import contrans_tl as ct
    from contrans_tl.capture import capture
    from contrans_tl.datasets import neutral_sentences
    from contrans_tl.tasks.emotion import emotion_scenarios
    from contrans_tl.tasks.emotion import contrast_prompts, evaluate_emotion, few_shot_prefix, split_scenarios
    from contrans_tl.metrics import layer_cosine
    from contrans_tl.sweep import CellStore, cell_key

    cfg = cfg.effective()
    out = Path(cfg.out)
    art = out / "artifacts"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "batch_size", "device", "extra")}
    store = CellStore(out / "cells", settings=settings)
    t0 = time.time()
    emotions = list(cfg.emotions)
    data = emotion_scenarios(cfg.data_dir, tuple(emotions))
    split = split_scenarios(data, seed=cfg.seed)
    prefix = few_shot_prefix(split.refine, seed=cfg.seed)

    def negatives(pool: dict[str, list[str]], emotion: str, k: int) -> list[str]:
        return [s for other in emotions if other != emotion for s in pool[other][:k]]

    _log(f"loading {cfg.source} and {cfg.target}")
    source = ct.load_model(cfg.source, device=cfg.device)
    target = ct.load_model(cfg.target, device=cfg.device)

    # ---- step 2 first: one map for all emotions ------------------------------------------
    map_path = art / "map.safetensors"
    if map_path.is_file():
        amap = ct.AffineMap.load(map_path)
    else:
        _log(f"fitting the affine map on {cfg.n_alignment} neutral sentences")
        amap = ct.fit_map(source, target, neutral_sentences()[: cfg.n_alignment], progress=True,
                          batch_size=cfg.batch_size, seed=cfg.seed)
        amap.save(map_path)

    # ---- step 1: refine per emotion in the source (and natively in the target) ------------
    def vector(model: Any, kind: str, emotion: str, n: int | None = None) -> ct.ConceptVector:
        path = art / f"{kind}_{emotion}{'' if n is None else f'_n{n}'}.safetensors"
        if path.is_file():
            return ct.ConceptVector.load(path)
        pos, neg = contrast_prompts(split.refine, emotion, n=n, seed=cfg.seed)
        v = ct.refine(model, pos, neg, batch_size=cfg.batch_size)
        v.save(path)
        return v

    _log("refining emotion vectors in source and target")
    n_main = cfg.n_refine if cfg.n_refine > 0 else None
    source_vecs = {e: vector(source, "source", e, n_main) for e in emotions}
    native_vecs = {e: vector(target, "native", e, n_main) for e in emotions}
    mapped_vecs = {e: amap.apply(source_vecs[e]) for e in emotions}

    def random_like(v: ct.ConceptVector, seed: int) -> ct.ConceptVector:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(v.vectors.shape, generator=g)
        noise = noise / noise.norm(dim=-1, keepdim=True) * v.vectors.norm(dim=-1, keepdim=True)
        return ct.ConceptVector(noise, v.model, v.layers, "random", v.layer_norms, n_prompts=0,
                                provenance={"seed": seed, "matched_to": "mapped"})

    def score(vec: ct.ConceptVector | None, emotion: str, layers: Sequence[int], alpha: float,
              scenarios: list[str]) -> dict[str, float]:
        if vec is None or alpha == 0:
            return evaluate_emotion(target, scenarios, emotion, prefix=prefix, batch_size=cfg.batch_size)
        with ct.transplant(target, vec, alpha=alpha, layers=layers, unit=cfg.unit):
            return evaluate_emotion(target, scenarios, emotion, prefix=prefix, batch_size=cfg.batch_size)

    # ---- choose the layer and alpha on the refinement half (validation) -------------------
    def validate(layers: Sequence[int], alpha: float) -> dict[str, float]:
        """Logit Acc of every mapped vector on refinement-half negatives (never the test half)."""
        return {e: score(mapped_vecs[e], e, layers, alpha, negatives(split.refine, e, cfg.n_validation))["logit_acc"]
                for e in emotions}

    n_tgt = int(target.cfg.n_layers)
    if cfg.layers is not None:
        layers = list(cfg.layers)
        selection: dict[str, Any] = {"how": "given by the user", "layers": layers}
        alpha_cells = {cell_key(phase="val", layer="-".join(map(str, layers)), alpha=a): a for a in cfg.alphas if a > 0}
        val_done = store.run(alpha_cells, lambda a: validate(layers, a), desc="validation")
        val = {a: val_done[key] for key, a in alpha_cells.items()}
        chosen_alpha = max(val, key=lambda a: sum(val[a].values()))
        selection["validation_logit_acc"] = {str(a): v for a, v in val.items()}
    else:
        candidates = sorted({min(n_tgt - 1, max(0, round(d * n_tgt) - 1)) for d in cfg.candidate_depths})
        _log(f"choosing the layer among {candidates} and alpha among {cfg.alphas} on validation scenarios")
        grid_cells = {cell_key(phase="val", layer=layer, alpha=a): (layer, a)
                      for layer in candidates for a in cfg.alphas if a > 0}
        val_done = store.run(grid_cells, lambda arg: validate([arg[0]], arg[1]), desc="validation")
        grid = {f"{layer}:{a:g}": val_done[key] for key, (layer, a) in grid_cells.items()}
        best = max(grid, key=lambda k: sum(grid[k].values()) / len(emotions))
        layers = [int(best.split(":")[0])]
        chosen_alpha = float(best.split(":")[1])
        selection = {
            "how": "mean Logit Acc of mapped vectors on refinement-half negatives "
                   f"({cfg.n_validation} per other emotion), over candidate layers x alphas",
            "grid_mean_logit_acc": {k: sum(v.values()) / len(v) for k, v in grid.items()},
            "layers": layers,
        }
    selection["alpha"] = chosen_alpha
    _log(f"transplanting at target layer(s) {layers}, validation-chosen alpha {chosen_alpha:g} ({cfg.unit})")

    # ---- evaluation on held-out scenarios: alpha sweep, controls ---------------------------
    results: dict[str, Any] = {}
    for e in emotions:
        neg = negatives(split.evaluate, e, cfg.n_negatives)
        pos = split.evaluate[e][: cfg.n_positives]
        cells: dict[str, Any] = {}
        for a in cfg.alphas:
            # alpha = 0 is the one baseline of every condition: run it once, under "mapped"
            for cond in ("mapped", "native") if a > 0 else ("mapped",):
                vec = mapped_vecs[e] if cond == "mapped" else native_vecs[e]
                cells[cell_key(emotion=e, cond=cond, alpha=a, layers="-".join(map(str, layers)))] = (cond, vec, a, None)
            # random control: every seed at the chosen alpha (the headline), one seed elsewhere (Fig 2a)
            for s in range(cfg.random_seeds if a == chosen_alpha else min(1, cfg.random_seeds)) if a > 0 else ():
                cells[cell_key(emotion=e, cond="random", seed=s, alpha=a,
                               layers="-".join(map(str, layers)))] = ("random", random_like(mapped_vecs[e], 1000 + s), a, s)

        def evaluate_cell(arg: tuple, e: str = e, neg: list[str] = neg, pos: list[str] = pos) -> dict[str, Any]:
            cond, vec, a, _seed = arg
            row = {"negatives": score(vec, e, layers, a, neg)}
            if cond != "random":
                row["positives"] = score(vec, e, layers, a, pos)
            return row

        done = store.run(cells, evaluate_cell, desc=f"evaluate {e}")
        table: dict[str, Any] = {"mapped": {}, "native": {}, "random": {}}
        for key, (cond, _vec, a, seed) in cells.items():
            if cond == "random":
                table["random"].setdefault(f"{a:g}", []).append(done[key]["negatives"])
            else:
                table[cond][f"{a:g}"] = done[key]
        table["native"]["0"] = table["mapped"]["0"]
        for a, rows in table["random"].items():
            table["random"][a] = {
                "negatives": {m: sum(r[m] for r in rows) / len(rows) for m in ("token_acc", "logit_acc")},
                "seeds": rows,
            }
        results[e] = table
        _log(f"{e}: done ({time.time() - t0:.0f}s)")

    # ---- Fig 5: number of refinement examples ---------------------------------------------
    n_examples: dict[str, dict[str, Any]] = {e: {} for e in emotions}
    size_cells: dict[str, tuple[str, int]] = {}
    for e in emotions:
        for n in cfg.n_examples:
            n_eff = len(split.refine[e]) if n <= 0 else min(n, len(split.refine[e]))
            if n_eff == (n_main or len(split.refine[e])):  # the main vector: already evaluated
                n_examples[e][str(n_eff)] = results[e]["mapped"][f"{chosen_alpha:g}"]["negatives"]
            else:
                size_cells[cell_key(phase="n_examples", emotion=e, n=n_eff, alpha=chosen_alpha,
                                    layers="-".join(map(str, layers)))] = (e, n_eff)
    sized = store.run(size_cells, lambda arg: score(amap.apply(vector(source, "source", arg[0], arg[1])), arg[0], layers,
                                                    chosen_alpha, negatives(split.evaluate, arg[0], cfg.n_negatives)),
                      desc="Fig 5: refinement sizes")
    for key, (e, n_eff) in size_cells.items():
        n_examples[e][str(n_eff)] = sized[key]

    # ---- hidden states for Fig 2b and Fig 7/8 (saved as arrays, plotted by plot()) ----------
    state_path = out / "states.pt"
    if not state_path.is_file():
        steered_emotion = max(emotions, key=lambda e: results[e]["mapped"][f"{chosen_alpha:g}"]["negatives"]["logit_acc"])
        texts = [s for e in emotions for s in split.evaluate[e][: cfg.n_positives]]
        labels = [e for e in emotions for _ in split.evaluate[e][: cfg.n_positives]]
        from contrans_tl.tasks.emotion import QUERY

        prompts = [QUERY.format(s) for s in texts]
        read_tgt = min(n_tgt - 1, layers[-1] + 1)
        read_src = amap.source_layers[amap.target_layers.index(layers[-1])] if layers[-1] in amap.target_layers else source.cfg.n_layers - 1
        before = capture(target, prompts, layers=[read_tgt])[:, 0]
        with ct.transplant(target, mapped_vecs[steered_emotion], alpha=chosen_alpha, layers=layers, unit=cfg.unit):
            after = capture(target, prompts, layers=[read_tgt])[:, 0]
        src_states = capture(source, prompts, layers=[read_src])[:, 0]
        torch.save({"before": before, "after": after, "source": src_states, "labels": labels,
                    "steered": steered_emotion, "target_layer": read_tgt, "source_layer": read_src}, state_path)

    cos = {e: float(layer_cosine(mapped_vecs[e].vectors, native_vecs[e].vectors)[layers].mean()) for e in emotions}
    a_key = f"{chosen_alpha:g}"
    headline = {
        e: {
            "baseline": results[e]["mapped"]["0"]["negatives"],
            "transplanted": results[e]["mapped"][a_key]["negatives"],
            "random": results[e]["random"].get(a_key, {}).get("negatives"),
            "native": results[e]["native"][a_key]["negatives"],
            "positives_baseline": results[e]["mapped"]["0"]["positives"],
            "positives_transplanted": results[e]["mapped"][a_key]["positives"],
        }
        for e in emotions
    }
    result = {
        "config": asdict(cfg),
        "source": asdict(ct.identity(source)),
        "target": asdict(ct.identity(target)),
        "layers": layers,
        "alpha": chosen_alpha,
        "unit": cfg.unit,
        "alphas": list(cfg.alphas),
        "selection": selection,
        "map": {"pairs": amap.pairs, "r2_heldout": [round(float(r), 4) for r in amap.r2_heldout],
                "ridge": amap.ridge.tolist(), **amap.provenance},
        "cosine_mapped_native": cos,
        "results": results,
        "headline": headline,
        "n_examples": n_examples,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "summary.md").write_text(summary_markdown(result))
    _log(f"wrote {out / 'results.json'} ({result['seconds']}s)")
    return result


def summary_markdown(result: dict[str, Any]) -> str:
    """A short markdown report: the headline table and how layer/alpha were chosen."""
    lines = [
        f"# Emotion transplantation: {result['source']['name']} → {result['target']['name']}",
        "",
        f"Transplanted at target layer(s) {result['layers']} with alpha = {result['alpha']:g} "
        f"({result['unit']} units), chosen on the refinement half: {result['selection']['how']}.",
        "",
        "Accuracy on held-out **negatives** (scenarios of the other five emotions): the rate at which "
        "the target answers the transplanted emotion. Token Acc / Logit Acc.",
        "",
        "| emotion | baseline (α=0) | transplanted | random (same norm) | native vector | cos(mapped, native) |",
        "|---|---|---|---|---|---|",
    ]

    def cell(m: dict[str, float] | None) -> str:
        return "—" if m is None else f"{m['token_acc']:.2f} / {m['logit_acc']:.2f}"

    for e, h in result["headline"].items():
        lines.append(f"| {e} | {cell(h['baseline'])} | {cell(h['transplanted'])} | {cell(h['random'])} | "
                     f"{cell(h['native'])} | {result['cosine_mapped_native'][e]:.2f} |")
    mean = {k: sum(h[k]["logit_acc"] for h in result["headline"].values() if h[k]) / len(result["headline"])
            for k in ("baseline", "transplanted", "native")}
    noise = [e for e, h in result["headline"].items()
             if h["random"] is not None and h["random"]["logit_acc"] >= h["transplanted"]["logit_acc"]]
    lines += [
        "",
        f"Mean Logit Acc on negatives: baseline {mean['baseline']:.2f}, transplanted {mean['transplanted']:.2f}, "
        f"native {mean['native']:.2f}.",
    ]
    if noise:
        lines += ["", f"Not separable from the random control (random Logit Acc >= transplanted): {', '.join(noise)}."]
    lines += [
        "",
        "On **positives** (the emotion's own scenarios), Token / Logit Acc baseline → transplanted:",
        "",
    ]
    for e, h in result["headline"].items():
        lines.append(f"- {e}: {cell(h['positives_baseline'])} → {cell(h['positives_transplanted'])}")
    r2 = result["map"]["r2_heldout"]
    lines += ["", f"Affine map: held-out R² from {min(r2):.2f} to {max(r2):.2f} over {len(r2)} layer pairs "
              f"({result['map'].get('n_train_samples')} word-aligned training samples).",
              f"Run time: {result['seconds']} s."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], out: str | Path) -> list[Path]:
    """Write Fig 2a, Fig 2b, Fig 5 and Fig 7/8 under ``out/figures``."""
    import numpy as np
    import torch

    from contrans_tl import plotting

    out = Path(out)
    fig_dir = out / "figures"
    written: list[Path] = []
    alphas = result["alphas"]
    keys = [f"{a:g}" for a in alphas]
    res = result["results"]
    tok = {e: [res[e]["mapped"][k]["negatives"]["token_acc"] for k in keys] for e in res}
    log = {e: [res[e]["mapped"][k]["negatives"]["logit_acc"] for k in keys] for e in res}
    rnd = {e: [res[e]["mapped"]["0"]["negatives"]["logit_acc"] if k == "0" else
               res[e]["random"].get(k, {}).get("negatives", {}).get("logit_acc", float("nan")) for k in keys] for e in res}
    title = f"{result['source']['name']} → {result['target']['name']}, layer {result['layers']}"
    written += plotting.save_figure(plotting.accuracy_vs_alpha(alphas, tok, log, title=title, random_logit_acc=rnd),
                                    fig_dir / "fig2a_accuracy_vs_alpha")
    n_ex = result["n_examples"]
    sizes = sorted({int(n) for e in n_ex for n in n_ex[e]})
    series = {e: [n_ex[e].get(str(n), {}).get("logit_acc", float("nan")) for n in sizes] for e in n_ex}
    written += plotting.save_figure(plotting.accuracy_vs_examples(sizes, series, title=title),
                                    fig_dir / "fig5_accuracy_vs_examples")
    states = torch.load(out / "states.pt")
    written += plotting.save_figure(
        plotting.pca_before_after(states["before"].numpy(), states["after"].numpy(), states["labels"],
                                  steered=states["steered"], title=f"target layer {states['target_layer']}"),
        fig_dir / "fig2b_pca_before_after")
    from sklearn.manifold import TSNE

    panels: dict[str, np.ndarray] = {}
    for name, arr in (("source", states["source"].numpy()), ("target", states["before"].numpy())):
        centred = arr - arr.mean(0, keepdims=True)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        panels[f"{name} PCA"] = centred @ vt[:2].T
        perplexity = max(2, min(30, len(arr) // 4))
        panels[f"{name} t-SNE"] = TSNE(n_components=2, perplexity=perplexity, random_state=0,
                                       init="pca").fit_transform(centred)
    written += plotting.save_figure(plotting.embedding_2d(panels, states["labels"]),
                                    fig_dir / "fig7_8_hidden_states_2d")
    return written


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags for every EmotionConfig field."""
    d = EmotionConfig()
    p.add_argument("--source", default=d.source)
    p.add_argument("--target", default=d.target)
    p.add_argument("--out", default=d.out)
    p.add_argument("--data-dir", default=None, help="directory of {emotion}.json scenario lists")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in d.alphas))
    p.add_argument("--unit", choices=["norm", "raw"], default=d.unit)
    p.add_argument("--layers", default=None, help="comma-separated target layers (default: chosen on validation)")
    p.add_argument("--n-negatives", type=int, default=d.n_negatives)
    p.add_argument("--n-positives", type=int, default=d.n_positives)
    p.add_argument("--n-refine", type=int, default=d.n_refine, help="refinement scenarios per side (0 = all)")
    p.add_argument("--random-seeds", type=int, default=d.random_seeds)
    p.add_argument("--n-alignment", type=int, default=d.n_alignment)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (a minute or two on CPU)")
    p.add_argument("--no-plots", action="store_true")


def config_from_args(args: argparse.Namespace) -> EmotionConfig:
    return EmotionConfig(
        source=args.source, target=args.target, out=args.out, data_dir=args.data_dir,
        alphas=tuple(float(a) for a in args.alphas.split(",")), unit=args.unit,
        layers=None if args.layers is None else tuple(int(x) for x in args.layers.split(",")),
        n_negatives=args.n_negatives, n_positives=args.n_positives, n_refine=args.n_refine, random_seeds=args.random_seeds,
        n_alignment=args.n_alignment, batch_size=args.batch_size, seed=args.seed, device=args.device,
        quick=args.quick,
    )


def cli_run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    result = run(cfg)
    if not args.no_plots:
        for path in plot(result, cfg.out):
            if path.suffix == ".png":
                print(f"figure: {path}")
    print((Path(cfg.out) / "summary.md").read_text())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_args(parser)
    return cli_run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
