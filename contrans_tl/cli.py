"""The ``contrans`` command: one subcommand per job, each a thin layer over the library.

``main(argv)`` returns an exit code, so tests call it directly. Subcommands register in
:data:`COMMANDS`: a name maps to (add_arguments, run) functions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from contrans_tl import flags
from contrans_tl import validate as v
from contrans_tl.entry import CommandParser, run_reporting_errors, split_debug
from contrans_tl.errors import ContransError, InvalidArgumentError

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


# ---- contrans models -------------------------------------------------------------------------
def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--prepare", nargs="*", metavar="NAME", type=flags.model_flag,
                   help="convert these built-in models now (default with no names: the default pair)")


def _models_run(args: argparse.Namespace) -> int:
    from contrans_tl.models import load_model
    from contrans_tl.offline import OFFLINE_MODELS, list_models

    if args.prepare is not None:
        names = args.prepare or [m.name for m in OFFLINE_MODELS.values() if m.default_pair]
        for name in names:
            load_model(name, device="cpu")
            print(f"prepared {name}")
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'name':30} {'arch':7} {'layers x d':>11}  installed  cached  install")
    for r in rows:
        shape = f"{r['layers']} x {r['d_model']}"
        print(f"{r['name']:30} {r['arch']:7} {shape:>11}  {str(r['installed']):9}  {str(r['cached']):6}  "
              f"{'' if r['installed'] else r['install']}")
    return 0


# ---- contrans refine / fit / generate: the three steps one at a time -----------------------
def _lines(path: str) -> list[str]:
    return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _refine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=flags.model_flag, help="built-in name, hub id, local directory or .gguf")
    p.add_argument("--positive", required=True, type=flags.text_file_flag, help="text file, one positive prompt per line")
    p.add_argument("--negative", required=True, type=flags.text_file_flag, help="text file, one negative prompt per line")
    p.add_argument("--method", choices=["mean_diff", "pca"], default="mean_diff")
    p.add_argument("--batch-size", type=flags.positive_int_flag, default=16)
    p.add_argument("--out", required=True, type=flags.out_file_flag, help="where to write the ConceptVector (.safetensors)")


def _refine_run(args: argparse.Namespace) -> int:
    from contrans_tl import load_model, refine

    if Path(args.positive).resolve() == Path(args.negative).resolve():
        raise InvalidArgumentError("--negative", args.negative, "another file than --positive (one set against itself "
                                   "gives a zero vector)")
    positive, negative = _lines(args.positive), _lines(args.negative)
    if sorted(positive) == sorted(negative):
        raise InvalidArgumentError("--negative", args.negative, "prompts that differ from --positive's (the same "
                                   "prompts on both sides give a zero vector)")
    model = load_model(args.model)
    vector = refine(model, positive, negative, method=args.method,
                    batch_size=args.batch_size, progress=True)
    print(f"wrote {vector.save(args.out)}")
    return 0


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=flags.model_flag)
    p.add_argument("target", type=flags.model_flag)
    text = p.add_mutually_exclusive_group()
    text.add_argument("--texts", type=flags.text_file_flag, help="text file, one text per line (same as --corpus file:FILE)")
    text.add_argument("--corpus", type=flags.corpus_flag,
                      help="map corpus: neutral[:N], file:PATH, wikisplit:PATH[:N], concept, or a union joined "
                           "by '+' such as concept+neutral (default: neutral, the built-in sentences)")
    p.add_argument("--concept-texts", type=flags.text_file_flag,
                   help="text file of the concept's own texts (contrast prompts, unlabeled domain text; never "
                        "evaluation items): what 'concept' in --corpus stands for")
    p.add_argument("--estimator", type=flags.estimator_flag, default="ridge",
                   help="map family: " + ", ".join(v.MAP_ESTIMATORS) + " (default: ridge)")
    p.add_argument("--rank", type=flags.positive_int_flag, help="rank of --estimator rrr (required), or canonical pairs "
                                                            "kept by --estimator whitened (default: all)")
    p.add_argument("--ridge", type=flags.ridge_flag, default="auto", help="'auto' (validation split) or a number >= 0")
    p.add_argument("--holdout", type=flags.fraction_flag, default=0.2, help="share of texts held out for R2, in [0, 1)")
    p.add_argument("--out", required=True, type=flags.out_file_flag, help="where to write the AffineMap (.safetensors)")


def _fit_run(args: argparse.Namespace) -> int:
    from contrans_tl import fit_map, load_model
    from contrans_tl.corpus import read_text_lines, resolve_corpus

    spec = f"file:{args.texts}" if args.texts else args.corpus or "neutral"
    concept = read_text_lines(args.concept_texts, what="concept text file") if args.concept_texts else None
    corpus = resolve_corpus(spec, concept_texts=concept)
    print(f"corpus {corpus.spec}: {len(corpus.texts)} texts (sha256 {corpus.provenance['sha256'][:16]})")
    amap = fit_map(load_model(args.source), load_model(args.target), corpus, estimator=args.estimator,
                   ridge=args.ridge, rank=args.rank, holdout=args.holdout, progress=True)
    for (s, t), r2 in zip(amap.pairs, amap.r2_heldout.tolist()):
        print(f"source {s:3d} -> target {t:3d}  held-out R2 {r2:.3f}  ({args.estimator})")
    print(f"wrote {amap.save(args.out)}")
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=flags.model_flag)
    p.add_argument("prompt", type=flags.text_flag)
    p.add_argument("--vector", type=flags.existing_file_flag, help="ConceptVector file to transplant (mapped or native)")
    p.add_argument("--map", type=flags.existing_file_flag, help="AffineMap to push a source vector through first")
    p.add_argument("--alpha", type=flags.finite_float_flag, default=0.0)
    p.add_argument("--unit", choices=["raw", "norm"], default="raw")
    p.add_argument("--layers", type=flags.layer_list_flag, help="comma-separated layers (default: the vector's)")
    p.add_argument("--max-new-tokens", type=flags.positive_int_flag, default=30)


def _generate_run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from contrans_tl import AffineMap, ConceptVector, generate, load_model, transplant

    model = load_model(args.model)
    context = nullcontext()
    if args.vector:
        vector = ConceptVector.load(args.vector)
        if args.map:
            vector = AffineMap.load(args.map).apply(vector)
        context = transplant(model, vector, alpha=args.alpha, layers=args.layers, unit=args.unit)
    with context:
        print(generate(model, args.prompt, max_new_tokens=args.max_new_tokens)[0])
    return 0


# ---- contrans bench: a developer tool in the source checkout, run in its own process -------
def checkout_root() -> Path | None:
    """The source checkout this package was installed from (editable), if it has bench/."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "bench" / "__init__.py").is_file() and (root / "pyproject.toml").is_file() else None


def bench_command(flags: Sequence[str]) -> list[str]:
    """The process that ``contrans bench FLAGS`` runs: ``python -m bench.run FLAGS`` (checkout only)."""
    if checkout_root() is None:
        raise ContransError("contrans bench needs a source checkout (bench/ beside contrans_tl/, "
                            "installed with `pip install -e .`); the wheel does not ship the benchmarks")
    return [sys.executable, "-m", "bench.run", *flags]


def _bench(flags: Sequence[str]) -> int:
    """bench/ is not part of the library: it runs in its own process with the checkout on its path."""
    import os
    import subprocess

    command = bench_command(flags)
    path = os.pathsep.join(filter(None, [str(checkout_root()), os.environ.get("PYTHONPATH")]))
    return subprocess.call(command, env={**os.environ, "PYTHONPATH": path})


def _bench_args(p: argparse.ArgumentParser) -> None:
    """Listed for --help only: main() hands every flag after `bench` to bench.run unparsed."""


def _bench_run(args: argparse.Namespace) -> int:
    return _bench([])


# ---- contrans report / layer-search / export: transfer reports and exports --------------------
def _report_args(p: argparse.ArgumentParser) -> None:
    from contrans_tl.analyses.transfer_report import add_report_args

    add_report_args(p)


def _report_run(args: argparse.Namespace) -> int:
    from contrans_tl.analyses.transfer_report import config_from_args, run_report

    run_report(config_from_args(args))
    return 0


def _layer_search_args(p: argparse.ArgumentParser) -> None:
    from contrans_tl.analyses.transfer_report import add_layer_search_args

    add_layer_search_args(p)


def _layer_search_run(args: argparse.Namespace) -> int:
    from contrans_tl.analyses.transfer_report import config_from_args, run_layer_search

    run_layer_search(config_from_args(args))
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("vector", type=flags.existing_file_flag,
                   help="ConceptVector file (a target-space vector, or a source one with --map)")
    p.add_argument("--map", type=flags.existing_file_flag, help="AffineMap to push the vector through first")
    p.add_argument("--format", choices=["gguf", "lm-eval"], required=True,
                   help="gguf: llama.cpp --control-vector file; lm-eval: steered model steer_path .pt")
    p.add_argument("--out", required=True, type=flags.out_file_flag, help="the file to write (not the input)")
    p.add_argument("--alpha", type=flags.finite_float_flag, default=1.0)
    p.add_argument("--unit", choices=["raw", "norm"], default="raw")
    p.add_argument("--layers", type=flags.layer_list_flag, help="comma-separated layers (default: the vector's)")
    p.add_argument("--hookpoint-template", type=flags.hookpoint_template_flag, default="layers.{layer}",
                   help="lm-eval hook point names")
    p.add_argument("--skip-layer0", action="store_true", help="gguf: drop layer 0 (llama.cpp cannot steer it)")


def _refuse_overwriting_inputs(flag: str, out: str, inputs: Sequence[str | None]) -> None:
    """An output path that is one of the command's input files would destroy that input."""
    for path in filter(None, inputs):
        if Path(out).resolve() == Path(path).resolve():
            raise InvalidArgumentError(flag, out, f"another path than the input {path} (it would be overwritten)")


def _export_run(args: argparse.Namespace) -> int:
    from contrans_tl import AffineMap, ConceptVector
    from contrans_tl.export import export_gguf, export_lm_eval

    _refuse_overwriting_inputs("--out", args.out, [args.vector, args.map])
    vector = ConceptVector.load(args.vector)
    if args.map:
        vector = AffineMap.load(args.map).apply(vector)
    layers = args.layers
    if args.format == "gguf":
        path = export_gguf(vector, args.out, alpha=args.alpha, unit=args.unit, layers=layers,
                           skip_layer0=args.skip_layer0)
    else:
        path = export_lm_eval(vector, args.out, alpha=args.alpha, unit=args.unit, layers=layers,
                              hookpoint_template=args.hookpoint_template)
    print(f"wrote {path}")
    return 0


COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {
    "models": ("list the built-in offline models (and --prepare them)", _models_args, _models_run),
    "refine": ("step 1: refine a concept vector from contrast prompts", _refine_args, _refine_run),
    "fit": ("step 2: fit an affine map source -> target", _fit_args, _fit_run),
    "generate": ("step 3: greedy generation with a transplanted vector", _generate_args, _generate_run),
    "report": ("transfer report: R2, cosine to the native vector, causal ratio (JSON + figure)", _report_args, _report_run),
    "layer-search": ("source x target layer grid: held-out R2 and logit-lens proxy (JSON + heatmaps)", _layer_search_args, _layer_search_run),
    "export": ("export a vector as a llama.cpp control vector or an lm-eval steering file", _export_args, _export_run),
    "bench": ("benchmarks (source checkout only; flags: `contrans bench --help`): speed and memory vs limits (bench.json)", _bench_args, _bench_run),
}


def build_parser() -> argparse.ArgumentParser:
    from contrans_tl.analyses import COMMANDS as ANALYSIS_COMMANDS  # the top layer: analyses are below it

    COMMANDS.update(ANALYSIS_COMMANDS)
    parser = CommandParser(prog="contrans", description=__doc__.splitlines()[0],
                           epilog="--debug (anywhere): show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``contrans`` command; returns the exit code (0 ok, 2 user error, 1 internal error)."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run_reporting_errors(lambda: _bench(argv[1:]), debug=debug)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a bad flag already reported in one line
        return int(stop.code or 0)
    return run_reporting_errors(lambda: args.run(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
