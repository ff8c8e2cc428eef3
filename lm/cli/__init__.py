"""The `kvjax` command line (`kvjax.lm.cli.main`), one module per subcommand: generate, stream,
ppl, bench, droidspeak, sot (`kvjax train` forwards to `kvjax.train.cli`). What they share,
public for every kvjax command line: `flags` (argparse types and the shared flags), `text`
(strict UTF-8 text from argv, files and stdin), `paths` (input and output path checks) and
`errors` (one-line error messages and exit statuses)."""

from kvjax.lm.cli.errors import LIBRARY_ERRORS, run
from kvjax.lm.cli.flags import (
  DEFAULT_MODEL,
  DTYPES,
  PROG,
  add_model_flag,
  add_sampling_flags,
  check_sampling_flags,
  checked,
  load_model,
  nonneg,
  positive,
  sampling_from_flags,
)
from kvjax.lm.cli.main import build_parser, main
from kvjax.lm.cli.text import read_prompts

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
