"""Text from the command line, files and stdin as strict UTF-8: an argparse type for text that
reaches the tokenizer, and readers whose errors name the flag, file or stdin line that holds
bytes that are not UTF-8."""

from __future__ import annotations

import argparse
import sys


def text_type(text: str) -> str:
  """An argparse `type` for text that reaches the tokenizer: refuses command-line bytes that
  are not UTF-8 (Python hands them over as surrogate escapes, '\\udcff' for 0xff)."""
  bad = not_unicode(text)
  if bad:
    raise argparse.ArgumentTypeError(f"not UTF-8 text ({bad})")
  return text


def not_unicode(text: str) -> str | None:
  """None for text that encodes as UTF-8, else what is wrong with it: the first byte that was
  not UTF-8 (a surrogate escape) or a lone surrogate, and where."""
  try:
    text.encode("utf-8")
    return None
  except UnicodeEncodeError as err:
    c = ord(text[err.start])
    if 0xDC80 <= c <= 0xDCFF:
      return f"undecodable byte 0x{c - 0xDC00:02x} at character {err.start}"
    return f"lone surrogate U+{c:04X} at character {err.start}"


def decode(data: bytes | str, what: str) -> str:
  """data as text: bytes decoded as strict UTF-8, a str refused if it holds undecoded bytes
  (surrogate escapes); ValueError naming `what` (e.g. "--text FILE") otherwise."""
  if isinstance(data, bytes):
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as err:
      raise ValueError(f"{what}: not UTF-8 text ({utf8_error(err)})") from None
  bad = not_unicode(data)
  if bad:
    raise ValueError(f"{what}: not UTF-8 text ({bad})")
  return data


def utf8_error(err: UnicodeDecodeError) -> str:
  """Where and why bytes failed to decode, e.g. "invalid start byte 0xff at byte 2"."""
  return f"{err.reason} 0x{err.object[err.start]:02x} at byte {err.start}"


def read_stdin(what: str) -> str:
  """All of stdin as strict UTF-8 text (read as bytes when it has them); ValueError naming
  `what` otherwise."""
  if sys.stdin is None:
    raise ValueError(f"{what}: there is no standard input")
  stream = getattr(sys.stdin, "buffer", sys.stdin)
  return decode(stream.read(), what)


def read_prompts(prompts: list[str], flag: str = "--prompt") -> list[str]:
  """Replaces a '-' prompt by stdin (strict UTF-8, one trailing newline removed); ValueError
  naming `flag` for undecodable text."""
  out = []
  for p in prompts:
    if p == "-":
      p = read_stdin(f"{flag} - (stdin)")
      p = p[:-1] if p.endswith("\n") else p
    else:
      p = decode(p, flag)  # argv text is checked by text_type; this covers library callers
    out.append(p)
  return out


def stdin_lines():
  """Chat turns: stdin line by line as strict UTF-8 (a prompt on stderr when it is a
  terminal); ValueError naming the line that is not UTF-8."""
  if sys.stdin is None:
    return
  stream = getattr(sys.stdin, "buffer", sys.stdin)
  n = 0
  while True:
    if sys.stdin.isatty():
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = stream.readline()
    if not line:
      return
    n += 1
    line = decode(line, f"stdin line {n}")
    yield line.rstrip("\n")


def read_text(path: str, flag: str = "--text") -> str:
  """The strict UTF-8 text of a file given by `flag` ("-" = stdin); ValueError naming the flag
  and the file otherwise."""
  if path == "-":
    return read_stdin(f"{flag} - (stdin)")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as err:
    raise ValueError(f"{flag} {path}: {err.strerror}") from None
  return decode(data, f"{flag} {path}")
