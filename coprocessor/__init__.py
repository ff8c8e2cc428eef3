"""Differentiable cache augmentation: a coprocessor writes latent embeddings into a frozen
model's KV cache (`kvjax.coprocessor.model`).

    from kvjax import lm, coprocessor
    base = lm.load("shakespeare")
    cop = coprocessor.init(base, n_latents=16)
    cache = coprocessor.augment(base, cop, cache)
"""

from kvjax.coprocessor.model import (Coprocessor, CoprocessorConfig, CoprocessorError, augment,
                                     init, load, save)

__all__ = ["Coprocessor", "CoprocessorConfig", "CoprocessorError", "augment", "init", "load",
           "save"]
