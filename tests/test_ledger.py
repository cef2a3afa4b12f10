"""The forward ledger counts what a run pushed through a model, once per steering setting."""

from __future__ import annotations

import torch

import contrans_tl as ct
from contrans_tl import ledger
from contrans_tl.capture import capture, encode, next_token_logits
from contrans_tl.ledger import Ledger, record_forwards

PROMPTS = ["The river runs past the mill.", "A short note.", "The river runs past the mill."]


def _vector(model, seed):
    g = torch.Generator().manual_seed(seed)
    n, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    return ct.ConceptVector(torch.randn(n, d, generator=g), ct.identity(model), tuple(range(n)), "random")


def test_rows_are_counted_once_per_setting(tiny_llama):
    label = str(tiny_llama.cfg.model_name)
    with record_forwards() as led:
        capture(tiny_llama, PROMPTS)
        capture(tiny_llama, PROMPTS[:1])  # the same row again, same (unsteered) setting
        with ct.transplant(tiny_llama, _vector(tiny_llama, 0), alpha=0.5, layers=[1]):
            capture(tiny_llama, PROMPTS[:2])
        with ct.transplant(tiny_llama, _vector(tiny_llama, 0), alpha=0.5, layers=[1]):
            capture(tiny_llama, PROMPTS[:1])  # the same offsets: the same setting as above
        with ct.transplant(tiny_llama, _vector(tiny_llama, 1), alpha=0.5, layers=[1]):
            capture(tiny_llama, PROMPTS[:1])  # another vector: a new setting
    ids, _ = encode(tiny_llama, PROMPTS[:2])
    unique = led.unique()[label]
    assert led.seen_rows[label] == 3 + 1 + 2 + 1 + 1
    assert len(led.groups[label]) == 3  # unsteered, vector 0, vector 1
    assert unique["rows"] == 2 + 2 + 1
    assert unique["row_tokens"] == 2 * sum(map(len, ids)) + len(ids[0])
    assert ledger.active_setting(tiny_llama) == ""  # every context closed


def test_prefix_counts_once_per_setting_and_round_trips(tiny_llama):
    label = str(tiny_llama.cfg.model_name)
    prefix = "Scenario: a calm day.\n"
    with record_forwards() as led:
        next_token_logits(tiny_llama, PROMPTS[:2], prefix=prefix)
        next_token_logits(tiny_llama, PROMPTS[1:], prefix=prefix)  # one new row, the prefix again
    (prefix_ids,), _ = encode(tiny_llama, [prefix])
    unique = led.unique()[label]
    assert led.seen_prefixes[label] == 2
    assert unique["prefixes"] == 1 and unique["prefix_tokens"] == len(prefix_ids)
    assert unique["rows"] == 2 and unique["tokens"] == unique["row_tokens"] + len(prefix_ids)
    again = Ledger.from_json(led.to_json())
    assert again.unique() == led.unique() and again.seen_rows == led.seen_rows


def test_closed_ledger_records_nothing(tiny_llama):
    with record_forwards() as led:
        pass
    capture(tiny_llama, PROMPTS[:1])
    with ct.transplant(tiny_llama, _vector(tiny_llama, 0), alpha=0.5, layers=[1]):
        assert ledger.active_setting(tiny_llama) == ""  # no digest while no ledger is open
    assert led.groups == {} and led.seen_rows == {}
