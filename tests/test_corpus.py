"""Map corpora as a choice (issue 23): spec → texts + provenance, the named errors of bad specs, the
map recording what it was fitted on, and `contrans fit --corpus/--estimator`."""

from __future__ import annotations

import argparse
import hashlib

import pytest
import torch

import contrans_tl as ct
from contrans_tl import flags
from contrans_tl.cli import main
from contrans_tl.corpus import MapCorpus, corpus_digest, resolve_corpus
from contrans_tl.datasets import neutral_sentences
from contrans_tl.errors import DataFormatError, DataUnavailableError, InvalidArgumentError
from contrans_tl.pairing import corpus_hash

pytestmark = pytest.mark.usefixtures("one_thread")

CONCEPT = ["I was furious when the bus left without me.", "She shouted at the referee.",
           "He slammed the door and walked out."]


def _sha256(texts: list[str]) -> str:
    return hashlib.sha256(b"".join(t.encode() + b"\x00" for t in texts)).hexdigest()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "my texts+more.txt"  # a '+' inside a path stays in the path
    path.write_text("  The mill stands by the river.\n\nTrains leave every hour.\nThe mill stands by the river.\n",
                    encoding="utf-8")
    return path


def test_neutral_all_and_first_n():
    every = resolve_corpus("neutral")
    assert list(every.texts) == neutral_sentences() and every.provenance["n_texts"] == 400
    first = resolve_corpus("neutral:7")
    assert list(first.texts) == neutral_sentences()[:7]
    assert first.provenance == {"spec": "neutral:7", "n_texts": 7, "sha256": _sha256(neutral_sentences()[:7]),
                                "parts": [{"spec": "neutral:7", "n_texts": 7}]}


def test_file_lines_stripped_blank_dropped_repeats_once(text_file):
    corpus = resolve_corpus(f"file:{text_file}")
    assert corpus.texts == ("The mill stands by the river.", "Trains leave every hour.")
    assert corpus.spec == f"file:{text_file}" and corpus.provenance["sha256"] == _sha256(list(corpus.texts))
    assert corpus_hash(corpus.texts) == corpus_digest(corpus.texts)[:16] == corpus.provenance["sha256"][:16]


def test_union_keeps_each_text_once_in_order():
    neutral = neutral_sentences()
    concept = CONCEPT + [neutral[1]]  # one concept text is also a neutral sentence
    corpus = resolve_corpus("concept+neutral:5", concept_texts=concept)
    assert list(corpus.texts) == CONCEPT + [neutral[1], neutral[0], neutral[2], neutral[3], neutral[4]]
    assert corpus.provenance["parts"] == [{"spec": "concept", "n_texts": 4}, {"spec": "neutral:5", "n_texts": 5}]
    assert corpus.provenance["n_texts"] == 8
    assert resolve_corpus("neutral:5+concept", concept_texts=concept).texts[:5] == tuple(neutral[:5])
    # concept texts are only read when the spec names them
    assert resolve_corpus("neutral:3", concept_texts=CONCEPT).texts == tuple(neutral[:3])


def test_wikisplit_first_n(tmp_path):
    tsv = tmp_path / "wiki.tsv"
    rows = ["The old bridge , built in 1850 , was closed to traffic in the spring of 1990 .\tx",
            "Too short .\tx",
            "She moved to Paris , where she studied painting for three long years .\tx",
            "A third sentence that is long enough to be kept by the loader here .\tx"]
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    corpus = resolve_corpus(f"wikisplit:{tsv}:2")
    assert corpus.texts == ("The old bridge, built in 1850, was closed to traffic in the spring of 1990.",
                            "She moved to Paris, where she studied painting for three long years.")
    assert len(resolve_corpus(f"wikisplit:{tmp_path / 'wiki.tsv'}").texts) == 3


def test_the_tasks_reader_is_the_core_one():
    from contrans_tl import datasets
    from contrans_tl.tasks import perplexity

    assert perplexity.load_wikisplit is datasets.load_wikisplit


@pytest.mark.parametrize("spec,error,fragment", [
    ("neutral:0", InvalidArgumentError, "'neutral:N' with N an integer >= 1"),
    ("neutral:401", InvalidArgumentError, "N <= 400"),
    ("neutral:x", InvalidArgumentError, "corpus='neutral:x'"),
    ("file:", InvalidArgumentError, "'file:PATH' with a path"),
    ("wikisplit:", InvalidArgumentError, "'wikisplit:PATH' with a path"),
    ("bogus", InvalidArgumentError, "'neutral' or 'neutral:N', 'file:PATH'"),
    ("", InvalidArgumentError, "a corpus spec"),
    ("concept", InvalidArgumentError, "concept_texts=None"),
    ("neutral+concept", InvalidArgumentError, "names 'concept'"),
    ("file:{tmp}/missing.txt", DataUnavailableError, "missing.txt"),
    ("file:{tmp}/empty.txt", DataFormatError, "every line is blank"),
    ("file:{tmp}/binary.bin", DataFormatError, "not UTF-8"),
    ("file:{tmp}/nul.txt", DataFormatError, "NUL"),
    ("wikisplit:{tmp}/none.tsv", DataUnavailableError, "none.tsv"),
    ("wikisplit:{tmp}/binary.bin", DataFormatError, "not UTF-8"),
])
def test_bad_specs_are_named(spec, error, fragment, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00\x81 not text")
    (tmp_path / "nul.txt").write_bytes(b"a line\x00 with a NUL\n")
    with pytest.raises(error, match=fragment):
        resolve_corpus(spec.replace("{tmp}", str(tmp_path)))


def test_concept_texts_are_checked():
    with pytest.raises(InvalidArgumentError, match="concept_texts="):
        resolve_corpus("concept", concept_texts="one string")
    with pytest.raises(ct.EmptyPromptsError, match="concept_texts"):
        resolve_corpus("concept", concept_texts=[])


def test_flags_for_the_command_line():
    assert flags.corpus_flag("concept+neutral:10") == "concept+neutral:10"
    assert flags.estimator_flag("procrustes") == "procrustes"
    for bad in ("neutral:0", "nope", "file:"):
        with pytest.raises(argparse.ArgumentTypeError, match="corpus="):
            flags.corpus_flag(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="estimator='Ridge'.*'lstsq', 'ridge', 'procrustes'"):
        flags.estimator_flag("Ridge")


# ---- the map records its corpus --------------------------------------------------------------------
def test_fit_map_records_the_corpus_spec_and_digest(tiny_llama, tiny_llama_b, text_file, tmp_path):
    lines = neutral_sentences()[:40]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines), encoding="utf-8")
    corpus = resolve_corpus(f"file:{path}")
    amap = ct.fit_map(tiny_llama, tiny_llama_b, corpus, alignment="words", layers=[(1, 2)])
    assert amap.provenance["corpus"] == {"spec": f"file:{path}", "n_texts": 40, "sha256": _sha256(lines),
                                         "parts": [{"spec": f"file:{path}", "n_texts": 40}]}
    assert amap.provenance["corpus_hash"] == _sha256(lines)[:16]
    plain = ct.fit_map(tiny_llama, tiny_llama_b, lines, alignment="words", layers=[(1, 2)])
    assert plain.provenance["corpus"] is None and torch.equal(plain.weight, amap.weight)
    loaded = ct.AffineMap.load(amap.save(tmp_path / "m.safetensors"))
    assert loaded.provenance["corpus"] == amap.provenance["corpus"]


def test_fit_from_states_checks_the_corpus_is_the_captured_one(tiny_llama, tiny_llama_b):
    corpus = resolve_corpus("concept+neutral:30", concept_texts=CONCEPT)
    xs, ys = ct.reformulate.capture_pair(tiny_llama, tiny_llama_b, list(corpus.texts), [1], [2], alignment="words")
    amap = ct.fit_map_from_states(xs, ys, layers=[(1, 2)], corpus=corpus)
    assert amap.provenance["corpus"]["spec"] == "concept+neutral:30" and amap.provenance["corpus"]["n_texts"] == 33
    other = resolve_corpus("neutral:33")
    with pytest.raises(InvalidArgumentError, match="corpus='neutral:33'.*captured on"):
        ct.fit_map_from_states(xs, ys, layers=[(1, 2)], corpus=other)
    with pytest.raises(InvalidArgumentError, match="corpus="):
        ct.fit_map_from_states(xs, ys, layers=[(1, 2)], corpus="neutral:33")
    assert isinstance(corpus, MapCorpus)


# ---- contrans fit ----------------------------------------------------------------------------------
def test_cli_fit_takes_corpus_and_estimator(tiny_dirs, tmp_path, capsys):
    lines = neutral_sentences()[:40]
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(lines), encoding="utf-8")
    concept = tmp_path / "concept.txt"
    concept.write_text("\n".join(CONCEPT), encoding="utf-8")
    src, tgt = str(tiny_dirs["llama"]), str(tiny_dirs["llama_b"])
    out = tmp_path / "p.safetensors"
    assert main(["fit", src, tgt, "--corpus", f"concept+file:{texts}", "--concept-texts", str(concept),
                 "--estimator", "procrustes", "--out", str(out)]) == 0
    amap = ct.AffineMap.load(out)
    assert amap.provenance["estimator"] == "procrustes"
    assert amap.provenance["corpus"]["spec"] == f"concept+file:{texts}" and amap.provenance["corpus"]["n_texts"] == 43
    for w, s in zip(amap.weight.double(), amap.provenance["scale"]):  # d_src 64 > d_tgt 48: orthonormal columns
        assert torch.allclose(w.T @ w / s**2, torch.eye(48, dtype=torch.float64), atol=1e-4)
    assert "procrustes" in capsys.readouterr().out
    # --texts FILE is --corpus file:FILE
    assert main(["fit", src, tgt, "--texts", str(texts), "--estimator", "rrr", "--rank", "5",
                 "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["fit", src, tgt, "--corpus", f"file:{texts}", "--estimator", "rrr", "--rank", "5",
                 "--out", str(tmp_path / "b.safetensors")]) == 0
    a, b = ct.AffineMap.load(tmp_path / "a.safetensors"), ct.AffineMap.load(tmp_path / "b.safetensors")
    assert a.provenance["corpus"]["spec"] == f"file:{texts}" and a.provenance == b.provenance
    assert torch.equal(a.weight, b.weight) and a.provenance["rank"] == 5
    assert all(int(torch.linalg.matrix_rank(w.double(), rtol=1e-5)) == 5 for w in a.weight)
