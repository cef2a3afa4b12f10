"""The evaluation tasks built on the core: emotion, TruthfulQA, ToxiGen, perplexity.

Each module is one task (or one piece the tasks share: ``scoring`` of continuations,
``prompts`` for chat templates and personas, ``selection`` of settings on validation data).
They import only core modules and each other, never reports, analyses or the CLI.
"""
