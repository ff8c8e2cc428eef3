"""The `kvjax` command line (`kvjax.lm.cli.main`), one module per subcommand: generate, stream,
ppl, bench, droidspeak, sot (`kvjax train` forwards to `kvjax.train.cli`); `flags` holds the
argparse types and flag helpers they share, public for every kvjax command line."""

from kvjax.lm.cli.flags import (
  DEFAULT_MODEL,
  DTYPES,
  LIBRARY_ERRORS,
  PROG,
  add_model_flag,
  add_sampling_flags,
  check_sampling_flags,
  checked,
  load_model,
  nonneg,
  positive,
  read_prompts,
  run,
  sampling_from_flags,
)
from kvjax.lm.cli.main import build_parser, main

__all__ = [
  "DEFAULT_MODEL",
  "DTYPES",
  "LIBRARY_ERRORS",
  "PROG",
  "add_model_flag",
  "add_sampling_flags",
  "build_parser",
  "check_sampling_flags",
  "checked",
  "load_model",
  "main",
  "nonneg",
  "positive",
  "read_prompts",
  "run",
  "sampling_from_flags",
]
