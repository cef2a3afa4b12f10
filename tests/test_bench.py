"""The benchmark runs end to end on the tiny models and writes the keys the issue names.

Only the plumbing is tested here (finite positive numbers in bench.json, the CLI wiring);
speed targets live in the benchmark itself, never in timed tests.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from bench.run import GOALS, TOP_LEVEL, BenchConfig, format_table, run_bench, write_json
from contrans_tl.cli import bench_command
from contrans_tl.testing import make_tiny_model_dir

# one thread: tiny ops on a shared 2-core machine are ~10x slower with two spinning threads
TINY = dict(repeats=1, n_prompts=2, gen_prompts=1, gen_tokens=2, corpus_size=12, fit_repeats=1,
            seq_lens=(8, 32), mem_batch=1, mem_repeats=1, threads=1)


@pytest.fixture(scope="module")
def tiny_result(tiny_llama, tiny_llama_b, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    # item 6 loads models by name; n_ctx 1024 holds the emotion task's few-shot block
    names = tuple(str(make_tiny_model_dir(root / k, "llama", seed=i, d_model=32, n_layers=2, n_ctx=1024))
                  for i, k in enumerate("ab"))
    cfg = BenchConfig.quick_run(models=(tiny_llama, tiny_llama_b), size_matrix_models=names, demo_models=names, **TINY)
    threads = torch.get_num_threads()
    result = run_bench(cfg, log=lambda msg: None)
    assert torch.get_num_threads() == threads  # the run restores the thread count
    path = write_json(result, tmp_path_factory.mktemp("bench"))
    return result, json.loads(path.read_text())


def test_bench_json_has_finite_positive_ratios(tiny_result):
    _, data = tiny_result
    for key in TOP_LEVEL:
        value = data[key]
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, (key, value)
    # item 6: N loads with --keep-loaded, 2N - 1 by the default route (N = 2)
    assert data["size_matrix"] == 1.0
    assert data["size_matrix_detail"]["keep_loaded"]["model_loads"] == 2
    assert data["size_matrix_detail"]["default"]["model_loads"] == 3
    assert set(data["goals"]) == set(GOALS)
    assert data["machine"]["device"] == "cpu" and data["machine"]["dtype"] == "float32"


def test_demo_against_its_floor(tiny_result):
    """Item 7: the quick demo ran in a child process; its floor counts each distinct row once."""
    _, data = tiny_result
    demo = data["demo"]
    assert "--quick" in demo["command"] and demo["quick"]
    for key in ("demo_vs_floor", "solver_fraction_full", "demo_peak_rss_vs_weights"):
        assert data[key] == demo[key] and math.isfinite(data[key]) and data[key] > 0, key
        assert data["goals"][key]["met"] in (True, False)
    from contrans_tl.analyses import emotion_transfer as et

    quick = et.Config(quick=True).effective(et.QUICK)
    concept_texts = {t for c in et._concepts(quick) for t in c.concept.contrast_texts}
    assert demo["solver_corpus_texts"] == len(concept_texts)  # the quick demo's corpus (its contrast prompts), labelled
    assert demo["demo_peak_rss_bytes"] > demo["fp32_weight_bytes"]  # a whole Python process holds more than weights
    for name, m in demo["floor"]["models"].items():
        assert 0 < m["rows"] and m["tokens"] <= m["demo_tokens"], name
        assert m["seconds"] > 0
    target = demo["floor"]["models"][max(demo["floor"]["models"], key=lambda k: demo["floor"]["models"][k]["groups"])]
    # the target: a prefixed group per steering setting its items were scored under (every emotion item follows
    # the few-shot block), and unprefixed groups: the fluency instrument's passes (the unsteered one and one per
    # steering it measured) and the hidden-state captures (corpus, contrast prompts; Fig 2b under steering)
    assert target["prefixes"] > 10 and target["groups"] - target["prefixes"] > 10


def test_bench_details_are_consistent(tiny_result):
    result, data = tiny_result
    assert len(data["models"]) == 2
    for entry in data["models"].values():
        capture = entry["capture"]
        assert capture["reference_rel_diff"] < 1e-3  # the baseline captures the same states
        for kind in ("refine", "plain", "reference"):
            assert capture[kind]["tokens_per_s"] > 0
        rows = entry["memory"]["rows"]
        assert [r["seq_len"] for r in rows] == sorted(r["seq_len"] for r in rows)
        # exact bytes: capture keeps one position per layer, the full cache every position
        assert rows[-1]["capture_cache_mib"] == rows[0]["capture_cache_mib"]
        assert rows[-1]["full_cache_cache_mib"] > rows[0]["full_cache_cache_mib"]
    fit = data["fit"]
    assert fit["n_samples"] > fit["n_texts"]  # word alignment: several samples per text
    table = format_table(result)
    assert all(key in table for key in TOP_LEVEL)


def test_cli_bench_command_runs_bench_in_its_own_process(tmp_path):
    """`contrans bench FLAGS` hands FLAGS unparsed to `python -m bench.run` (the library never imports bench)."""
    flags = ["--quick", "--out", str(tmp_path), "--models", "a", "b"]
    assert bench_command(flags)[1:] == ["-m", "bench.run", *flags]
    from bench import add_arguments
    from bench.run import config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(flags)
    assert args.quick and args.out == str(tmp_path) and args.models == ["a", "b"]
    cfg = config_from_args(args)
    assert cfg.quick and cfg.models == ("a", "b") and cfg.repeats >= 1


def _matrix(hits: dict[str, int], n: int = 50) -> dict:
    """A size-matrix result of two models, one emotion: the first ``hits`` of n items answered per 'S -> T' cell."""
    models = ["a", "b"]
    cells = {k: {"happiness": {"logit_acc": h / n, "n": n, "logit_hits": [1] * h + [0] * (n - h)}} for k, h in hits.items()}
    return {"models": models, "task": {"seed": 0}, "steering_layers": {"a": 1, "b": 1}, "metric": "logit_acc",
            "baseline": {m: {"mean_logit_acc": 0.1} for m in models}, "matrices": {"0.3": {"cells": cells}}}


def test_fig4_maps_compares_the_two_corpora_cell_by_cell_with_an_interval():
    from bench.fig4_maps import compare

    same = {"a -> a": 20, "b -> b": 20, "b -> a": 10}
    table = compare(_matrix({**same, "a -> b": 10}), _matrix({**same, "a -> b": 40}))
    assert "0.200 → **0.800** (+0.600 [+0.4" in table and "0.200 → **0.200** (+0.000 [-0.0" in table
    assert "above 0: 1; below 0: 0; of 2" in table
    table = compare(_matrix({**same, "a -> b": 25}), _matrix({**same, "a -> b": 28}))  # 3 more of 50: within noise
    assert "above 0: 0; below 0: 0; of 2" in table
    table = compare(_matrix({**same, "a -> b": 25}), _matrix({**same, "a -> b": 20}))
    assert "above 0: 0; below 0: 1; of 2" in table  # 5 items lost, none gained: paired, that is a fall
    with pytest.raises(Exception, match="baseline"):  # two runs on other items are refused
        other = _matrix({**same, "a -> b": 40})
        other["baseline"]["b"]["mean_logit_acc"] = 0.2
        compare(_matrix({**same, "a -> b": 10}), other)
    old = _matrix({**same, "a -> b": 40})
    del old["matrices"]["0.3"]["cells"]["a -> b"]["happiness"]["logit_hits"]
    with pytest.raises(Exception, match="per-item outcomes"):  # a run from before cells kept them
        compare(_matrix({**same, "a -> b": 10}), old)
