"""Differentiable cache augmentation: a coprocessor writes latent embeddings into a frozen
model's KV cache (`kvjax.coprocessor.model`; training in `kvjax.train.coprocessor`).

    from kvjax import lm, coprocessor
    base = lm.load("shakespeare")
    cop = coprocessor.load("shakespeare-16", base)
    cache = coprocessor.augment(base, cop, cache)
    out = coprocessor.generate(base, cop, "ROMEO.", delay=0)
"""

from kvjax.coprocessor.generate import generate
from kvjax.coprocessor.model import (
  Coprocessor,
  CoprocessorConfig,
  CoprocessorError,
  augment,
  init,
  insert,
  latents,
  load,
  resolve,
  save,
  shipped,
)

__all__ = [
  "Coprocessor",
  "CoprocessorConfig",
  "CoprocessorError",
  "augment",
  "generate",
  "init",
  "insert",
  "latents",
  "load",
  "resolve",
  "save",
  "shipped",
]
