"""Checks that a command's input and output paths can be used, before the work starts (so a
long run does not end on a path it cannot read or write): parser.error naming the flag."""

from __future__ import annotations

import argparse
import os


def check_input_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
  """parser.error unless path ('-' = stdin passes) is an existing, readable regular file."""
  if path is None or path == "-":
    return
  if not os.path.exists(path):
    parser.error(f"{flag} {path}: no such file")
  if os.path.isdir(path):
    parser.error(f"{flag} {path}: is a directory; expected a file")
  if not os.access(path, os.R_OK):
    parser.error(f"{flag} {path}: not readable (permission denied)")


def check_output(
  parser: argparse.ArgumentParser, flag: str, path: str | None, *, directory: bool
) -> None:
  """parser.error unless path (a file, or with directory=True a directory) can be written: it
  is of that kind or absent, and the directory it is or goes into is writable. Checked before
  the work starts, so that a long run does not end on a path it cannot write."""
  if path is None:
    return
  wrong = output_error(path, directory=directory)
  if wrong:
    parser.error(f"{flag} {path}: {wrong}")


def output_error(path: str, *, directory: bool) -> str | None:
  """What stops writing path (see check_output), or None."""
  if os.path.exists(path):
    if directory and not os.path.isdir(path):
      return "exists and is not a directory"
    if not directory and os.path.isdir(path):
      return "is a directory; expected a file path"
    if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
      return "not writable (permission denied)"
    return None
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    return f"{above} is not a directory"
  if not os.access(above, os.W_OK | os.X_OK):
    return f"cannot create it: {above} is not writable"
  return None
