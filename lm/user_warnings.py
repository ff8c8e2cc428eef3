"""Warnings attributed to the user's code: the first frame outside kvjax's own packages, however
deep inside the library the warning is raised (the right `stacklevel` changes with every path
that reaches it: `lm.load` -> a GGUF file's converted copy -> the checkpoint reader ...)."""

from __future__ import annotations

import os
import sys
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# kvjax's packages (the repository's tests/, benchmarks/, docs/ are users of them)
_PACKAGES = tuple(
  os.path.join(_ROOT, p) + os.sep
  for p in ("lm", "cache", "speculative", "coprocessor", "train", "pallas_kernels")
)


def warn(message: str, category: type[Warning]) -> None:
  """warnings.warn(message, category), reported at the nearest caller outside kvjax."""
  level, frame = 2, sys._getframe(1)
  while frame is not None and frame.f_code.co_filename.startswith(_PACKAGES):
    frame, level = frame.f_back, level + 1
  warnings.warn(message, category, stacklevel=level)
