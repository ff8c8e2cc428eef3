"""Helpers the tests share: running the `kvjax` command in-process, checking an error's type and
message, and editing a checkpoint directory's files."""

import contextlib
import io
import json
import os
import sys

import pytest
from safetensors.numpy import load_file, save_file

from kvjax import lm
from kvjax.lm.cli import main


def cli(*argv, stdin=None):
  """Runs `kvjax ARGV` in-process -> (exit code, stdout, stderr)."""
  out, err = io.StringIO(), io.StringIO()
  old_stdin = sys.stdin
  sys.stdin = io.StringIO(stdin or "")
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      code = main([str(a) for a in argv])
  finally:
    sys.stdin = old_stdin
  return code, out.getvalue(), err.getvalue()


def raises(exc, fn, *parts):
  """fn() raises exactly `exc` (not a subclass or a parent) with every part in its message."""
  with pytest.raises(exc) as info:
    fn()
  assert type(info.value) is exc, f"{type(info.value).__name__}: {info.value}"
  msg = str(info.value)
  missing = [p for p in parts if str(p) not in msg]
  assert not missing, f"{missing} not in message: {msg}"
  return msg


def load_fails(exc, d, file: str | None, *parts) -> str:
  """`lm.load(d)` raises exactly `exc` whose message names the path of `file` in d (unless
  None) and holds every part; returns the message."""
  named = () if file is None else (os.path.join(d, file),)
  return raises(exc, lambda: lm.load(d), *named, *parts)


def edit_json(d, name, fn):
  file = os.path.join(d, name)
  with open(file) as f:
    data = json.load(f)
  fn(data)
  with open(file, "w") as f:
    json.dump(data, f)


def edit_tensors(d, fn, file="model.safetensors"):
  tensors = load_file(os.path.join(d, file))
  fn(tensors)
  save_file(tensors, os.path.join(d, file), metadata={"format": "pt"})


def write(d, name, text: str | bytes):
  with open(os.path.join(d, name), "wb") as f:
    f.write(text.encode() if isinstance(text, str) else text)
