"""The `kvjax` command line: one program, one subcommand per job, `--json` for machines.

    kvjax generate --prompt "ROMEO:" [--model DIR_OR_NAME] [--max-new-tokens 64] [--json]
    kvjax stream --prompt "ROMEO:" --sinks 4 --window 252      (or a chat from stdin)
    kvjax ppl --text FILE --cache sink --window 252
    kvjax generate --prompt "ROMEO:" --coprocessor shakespeare-16 [--delay 2]
    kvjax ppl --text FILE --coprocessor shakespeare-16 --json   (ppl by position after points)
    kvjax droidspeak {run,send,receive} --plan 0-1 --prompt-file FILE   (lm/cli/droidspeak.py)
    kvjax sot --question "..." [--skeleton "1. ...\\n2. ..."] [--json]      (lm/cli/sot.py)
    kvjax bench [--model DIR_OR_NAME] [--batches 1,8] [--contexts 256,4096] [--json]
    kvjax models                       (the names --model takes; how to install the others)
    python -m kvjax generate ...

Each subcommand is a module of this package: its NAME, HELP (its line in `kvjax --help`) and
DESCRIPTION make its parser, and its `add_flags(parser)` adds the flags and sets `run` (does the
work, returns the exit code) and `check` (cross-flag validation, reports through the
subcommand's parser); `flags`, `text`, `paths` and `errors` hold what they share. Every error is
one line on stderr, no traceback: bad flags (a value out of range, command-line text that is not
UTF-8, an input file that is missing or a directory, an output path that cannot be written) exit
2 with `kvjax COMMAND: error: <message>`; a model, file, port, text or chat template that fails
once the work runs exits 1 with `kvjax: error: <message>` naming it (see errors.run).
"""

from __future__ import annotations

import argparse
import sys
import types

from kvjax.lm.cli import bench, droidspeak, generate, models, ppl, sinks, sot, stream
from kvjax.lm.cli.errors import Parser, run
from kvjax.lm.cli.flags import PROG


def build_parser() -> argparse.ArgumentParser:
  """The `kvjax` parser with every subcommand."""
  parser = Parser(
    prog=PROG, description="LLM inference in JAX with the KV cache as an explicit value."
  )
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for command in (generate, stream, ppl):
    _add(subparsers, command)
  _add_train(subparsers)
  for command in (bench, droidspeak, sot, sinks, models):
    _add(subparsers, command)
  return parser


def _add(subparsers, command: types.ModuleType) -> None:
  """The subcommand that `command`, a module of this package, defines."""
  p = subparsers.add_parser(command.NAME, help=command.HELP, description=command.DESCRIPTION)
  command.add_flags(p)


def main(argv: list[str] | None = None) -> int:
  """Runs `kvjax ARGV...`; returns the exit code (0 ok, 1 library error, 2 bad flags)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # forwarded whole, so `kvjax train --help` is the trainer's help
    from kvjax.train.cli import main as train_main

    return train_main(argv[1:], prog=f"{PROG} train")
  return run(build_parser(), argv, lambda args: PROG)


def _add_train(subparsers) -> None:
  """`kvjax train TASK ...`: listed here for --help; `main` forwards it to kvjax.train.cli."""
  p = subparsers.add_parser(
    "train",
    add_help=False,
    help="train a model (kvjax train lm --help)",
    description="Same as python -m kvjax.train.",
  )
  p.add_argument("argv", nargs=argparse.REMAINDER)

  def run(args: argparse.Namespace) -> int:
    from kvjax.train.cli import main as train_main

    return train_main(args.argv, prog=f"{PROG} train")

  p.set_defaults(run=run, check=lambda args: None)
