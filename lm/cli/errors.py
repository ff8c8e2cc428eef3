"""Error reporting for every kvjax command line: `run` turns every error of bad input (the
library's, the operating system's, undecodable text, a broken chat template) into one line,
`PROG: error: MESSAGE`, naming the flag, file, port or model at fault, and an exit status."""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings

import jinja2

from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.cli.text import utf8_error
from kvjax.lm.config import ConfigError
from kvjax.lm.engine import NonFiniteError
from kvjax.lm.tokenizer import TokenizerError

# What `run` reports as one line (ValueError covers every kvjax error class and undecodable
# text; OSError missing, unreadable or unwritable files and sockets); anything else is a bug.
LIBRARY_ERRORS = (
  ConfigError,
  CheckpointError,
  TokenizerError,
  ValueError,
  OSError,
  OverflowError,
  jinja2.TemplateError,
  NonFiniteError,
)


def one_line(message: str) -> str:
  """message with its line breaks (and the indentation after them) folded into spaces."""
  return re.sub(r"\s*\n\s*", " ", str(message).strip())


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `PROG: error: MESSAGE`, exit status 2 (the usage is
  in --help). Subparsers inherit it."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def run(parser: argparse.ArgumentParser, argv: list[str] | None, label) -> int:
  """Parses argv, runs the chosen subcommand. Bad flags give 2 (argparse's one-line message, or
  `check`'s), --help 0; an error of bad input while checking or running (the library's
  ValueErrors, OSErrors, undecodable text, a chat template that fails) prints one line,
  `label(args): error: ...`, and gives 1 (a warning prints `label(args): warning: ...`);
  Ctrl-C 130; a closed stdout (`| head`) 141, silently. Any other exception is a bug and
  keeps its traceback."""
  try:
    args = parser.parse_args(argv)
  except SystemExit as done:  # argparse's error() (2) and --help (0)
    return done.code or 0
  try:
    with warnings.catch_warnings():  # a warning is one line too: `kvjax: warning: ...`
      warnings.showwarning = lambda message, *_: print(
        f"{label(args)}: warning: {one_line(message)}", file=sys.stderr
      )
      args.check(args)
      return args.run(args)
  except SystemExit as done:  # a check's parser.error
    return done.code or 0
  except KeyboardInterrupt as err:  # a message (e.g. training's: where to resume) or none
    print(f"\n{label(args)}: {err}" if str(err) else "", file=sys.stderr)
    return 130
  except BrokenPipeError:
    _quiet_stdout()
    return 141
  except LIBRARY_ERRORS as err:
    print(f"{label(args)}: error: {one_line(describe(err, args, parser))}", file=sys.stderr)
    return 1


def describe(
  err: BaseException,
  args: argparse.Namespace | None = None,
  parser: argparse.ArgumentParser | None = None,
) -> str:
  """The one-line message for an error `run` reports: what failed, on which file, port, flag
  or model, and what was expected."""
  if isinstance(err, UnicodeDecodeError):  # a source that did not name itself (see decode)
    return f"input is not UTF-8 text ({utf8_error(err)})"
  if isinstance(err, UnicodeEncodeError):
    what = err.object[err.start : err.end]
    msg = f"cannot encode {what!r} as {err.encoding} ({err.reason})"
    out = getattr(sys.stdout, "encoding", None) or ""
    if out.lower().replace("-", "") != "utf8":
      msg += f"; stdout's encoding is {out or 'unknown'}: set PYTHONIOENCODING=utf-8"
    return msg
  if isinstance(err, jinja2.TemplateError):
    model = next(
      (
        getattr(args, a)
        for a in ("model", "receiver", "target", "base")
        if isinstance(getattr(args, a, None), str)
      ),
      "the model",
    )
    where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
    return f"the chat template of {model} failed{where}: {err.message or type(err).__name__}"
  if isinstance(err, OSError):
    return os_message(err, args, parser)
  if isinstance(err, OverflowError):
    return f"a number is out of range ({err})"
  return str(err)


def os_message(
  err: OSError,
  args: argparse.Namespace | None = None,
  parser: argparse.ArgumentParser | None = None,
) -> str:
  """`[--flag] PATH: what is wrong` for an OSError on a file (the flag whose path holds it,
  when args has one), its own message otherwise (a socket's names its host and port)."""
  what = err.strerror or str(err) or type(err).__name__
  if err.filename is None:
    return what
  path = os.fsdecode(err.filename)
  if err.filename2 is not None:
    path += f" -> {os.fsdecode(err.filename2)}"
  flag = flag_of_path(args, parser, os.fsdecode(err.filename))
  return f"{flag + ' ' if flag else ''}{path}: {what}"


def flag_of_path(args, parser, path: str) -> str | None:
  """The flag of args whose path is `path` ("--text") or the nearest directory above it
  ("--out DIR:"), or None."""
  if args is None or parser is None:
    return None
  options = _options(parser)
  target = os.path.abspath(path)
  best = None
  for dest, value in vars(args).items():
    if dest not in options or not isinstance(value, str) or value in ("", "-"):
      continue
    given = os.path.abspath(value)
    if target == given:
      return options[dest]
    if target.startswith(given.rstrip(os.sep) + os.sep) and (
      best is None or len(given) > len(os.path.abspath(best[1]))
    ):
      best = options[dest], value
  return None if best is None else f"{best[0]} {best[1]}:"


def _options(parser: argparse.ArgumentParser) -> dict[str, str]:
  """dest -> its longest option string (--prompt-file, not -f), over the parser and every
  subparser."""
  out: dict[str, str] = {}
  todo = [parser]
  while todo:
    p = todo.pop()
    for action in p._actions:
      if isinstance(action, argparse._SubParsersAction):
        todo.extend(action.choices.values())
      elif action.option_strings:
        out.setdefault(action.dest, max(action.option_strings, key=len))
  return out


def _quiet_stdout() -> None:
  """Points stdout at /dev/null so that the interpreter's final flush into a closed pipe
  stays silent."""
  try:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, sys.stdout.fileno())
  except (OSError, ValueError, AttributeError):  # stdout is no file (tests capture it)
    pass
