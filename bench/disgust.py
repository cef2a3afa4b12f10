"""Issue #23 item 5: why SmolLM2's own disgust vector does not steer SmolLM2 (label token, prompts, layer).

Each emotion's native SmolLM2 vector is transplanted into SmolLM2 itself at several layers and
strengths; Logit and Token Acc on the emotion's test negatives are read with the concept task's
scorer, and the fluency instrument gives each strength's KL on generic text. Also printed: how
SmolLM2 tokenizes each label, and how often the unsteered model and the prompting baseline answer it.

    python -m bench.disgust --out /tmp/disgust
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import contrans_tl as ct
from contrans_tl.datasets import generic_texts
from contrans_tl.files import write_json
from contrans_tl.fluency import measure_fluency
from contrans_tl.metrics import layer_cosine
from contrans_tl.tasks.concept import prompted_items, score_items
from contrans_tl.tasks.emotion import EMOTIONS, INSTRUCTION, LABELS, emotion_accuracy, emotion_task
from contrans_tl.tasks.scoring import choice_tokens
from contrans_tl.transplant import Steering


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.disgust")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--out", required=True)
    p.add_argument("--depths", default="0.33,0.5,0.67,0.83,0.97")
    p.add_argument("--alphas", default="0.05,0.1,0.2,0.4,0.8")
    args = p.parse_args(argv)
    model = ct.load_model(args.model)
    task = emotion_task(n_eval=10, n_validation=4, seed=0)
    n = int(model.cfg.n_layers)
    layers = sorted({min(n - 1, max(0, round(float(d) * n) - 1)) for d in args.depths.split(",")})
    alphas = [float(a) for a in args.alphas.split(",")]
    prompt = task.items("disgust", task.negatives("disgust")[:1])[0].prompt
    tokens = {e: [model.tokenizer.decode([t]) for t in choice_tokens(model.tokenizer, prompt, " " + LABELS[e])]
              for e in EMOTIONS}
    out: dict = {"model": args.model, "label_tokens": tokens, "layers": layers, "alphas": alphas, "emotions": {}}
    states = {}
    for e in EMOTIONS:
        pos, neg = task.contrast(e)
        v = ct.refine(model, pos, neg)
        items = task.items(e, task.negatives(e))
        row: dict = {"baseline": emotion_accuracy(score_items(model, items, prefix=task.prefix)),
                     "prompting": emotion_accuracy(score_items(model, prompted_items(items, INSTRUCTION.format(label=LABELS[e])),
                                                               prefix=task.prefix)),
                     "vector_norm_per_layer": [round(float(x), 2) for x in v.vectors.norm(dim=-1)], "grid": {}}
        settings = {(layer, a): Steering.single(v, a, [layer], "norm") for layer in layers for a in alphas}
        flu = measure_fluency(model, generic_texts()[:8], settings)
        for (layer, a), s in settings.items():
            with s.apply(model):
                acc = emotion_accuracy(score_items(model, items, prefix=task.prefix))
            row["grid"][f"{layer}:{a:g}"] = {"kl": flu[(layer, a)].kl, **acc}
        out["emotions"][e] = row
        states[e] = v
        best = max(row["grid"].items(), key=lambda kv: kv[1]["logit_acc"])
        print(e, tokens[e], "baseline", row["baseline"]["logit_acc"], "prompting", row["prompting"]["logit_acc"],
              "best", best[0], best[1]["logit_acc"], best[1]["token_acc"], "kl", round(best[1]["kl"], 3), file=sys.stderr)
    cos = layer_cosine(states["disgust"].vectors, states["anger"].vectors)
    out["cosine_disgust_anger_per_layer"] = [round(float(x), 3) for x in cos]
    write_json(Path(args.out) / "disgust.json", out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
