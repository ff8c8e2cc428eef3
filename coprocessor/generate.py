"""Generation with a coprocessor: `kvjax.lm.generate` with the coprocessor's augmented prefill
(`Coprocessor.prefiller`, in `kvjax.coprocessor.model`)."""

from __future__ import annotations

from collections.abc import Sequence

from kvjax.coprocessor.model import Coprocessor
from kvjax.lm.generate import Generation, Prompt
from kvjax.lm.generate import generate as lm_generate
from kvjax.lm.model import Model


def generate(
  base: Model, cop: Coprocessor, prompts: Prompt | Sequence[Prompt], *, delay: int = 0, **kwargs
) -> Generation:
  """`kvjax.lm.generate(base, prompts, **kwargs)` with the latents of `cop` inserted before each
  prompt's last token, arriving `delay` tokens late (0: before it)."""
  if not isinstance(cop, Coprocessor):
    raise TypeError(f"cop must be a kvjax.coprocessor.Coprocessor; got {type(cop).__name__}")
  return lm_generate(base, prompts, prefill=cop.prefiller(delay), **kwargs)
