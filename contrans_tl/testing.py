"""Tiny randomly initialised models built offline from a config, for fast tests and examples.

A byte-level BPE tokenizer is trained in memory on the built-in neutral text, a 2-layer
model of the requested architecture is initialised from a seed, and both are saved as an
ordinary HF checkpoint directory that :func:`contrans_tl.load_model` boots like any other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from contrans_tl.datasets import neutral_sentences

__all__ = ["TINY_ARCHS", "make_tiny_tokenizer", "make_tiny_model_dir"]

TINY_ARCHS = ("llama", "gpt_neox")
"""Architectures :func:`make_tiny_model_dir` can build."""


def make_tiny_tokenizer(vocab_size: int = 512):  # -> PreTrainedTokenizerFast
    """Byte-level BPE trained on the neutral sentences; BOS/EOS/PAD are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(neutral_sentences(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def make_tiny_model_dir(
    path: str | Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_ctx: int = 128,
) -> Path:
    """Save a tiny random ``arch`` model plus tokenizer under ``path`` and return it."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        intermediate_size=4 * d_model,
        max_position_embeddings=n_ctx,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif arch == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(rotary_pct=0.25, **common))
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {TINY_ARCHS}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
