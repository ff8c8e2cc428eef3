"""The points of a Skeleton-of-Thought skeleton, read from text as a model or a user wrote it.

A skeleton is a short list: numbered lines ("1.", "1)", "(1)", "1:", "1 -", optionally in
markdown bold or behind a "#" heading) or, when no line is numbered, bullets ("-", "*", "•",
"+", "–"). Text before the first point and text after a blank line that ends the list are
dropped; other lines continue the point above them (a bullet under a numbered point is part of
that point). "1. a 2. b 3. c" on one line is three points.
"""

from __future__ import annotations

import re

_NUMBERED = re.compile(
  r"\s*(?:#{1,6}\s*)?(?:\*\*|__)?(?:\((\d{1,3})\)|(\d{1,3})(?:[.):]|\s+-))"
  r"(?:\*\*|__)?(?=\s|$)"
)
_BULLET = re.compile(r"(\s*)[-*•+–—](?=\s)")
_EMPHASIS = re.compile(r"\*\*|(?<!\w)__|__(?!\w)")  # bold markers; "__" inside a word stays


class SkeletonError(ValueError):
  """A skeleton with no usable points, or more than allowed."""


def _marker(line: str) -> tuple[int, str] | None:
  """(number, rest of the line) for a numbered line, else None."""
  m = _NUMBERED.match(line)
  return None if m is None else (int(m.group(1) or m.group(2)), line[m.end() :])


def _split_inline(n: int, text: str) -> list[tuple[int, str]]:
  """[(n, text)], split where "k. " or "k) " with k exactly one more than the number before it
  follows whitespace: "a 2. b 3. c" after 1 gives [(1, "a"), (2, "b"), (3, "c")]."""
  out = []
  while (m := re.search(rf"(?<=\s){n + 1}[.)]\s+(?=\S)", text)) and text[: m.start()].strip():
    out.append((n, text[: m.start()]))
    n, text = n + 1, text[m.end() :]
  return out + [(n, text)]


def _clean(parts: list[str]) -> str:
  """One point's text: its lines joined, whitespace runs made single spaces, without emphasis
  markers or a trailing colon."""
  text = " ".join(" ".join(parts).split())
  text = _EMPHASIS.sub("", text).strip()
  return re.sub(r"(?:\s*:)+$", "", text).strip()


def parse_points(text: str, *, max_points: int = 10) -> list[str]:
  """The skeleton's points in order of appearance. Within numbered lists the first point with
  a number wins (a later one with that number is dropped with its lines, unless the first is
  still empty: "1." then "1. text" is one point); skipped numbers are fine. Raises
  SkeletonError for no points, a point with no text (never dropped: the points after it would
  be renumbered) or more than `max_points` (never truncates)."""
  if not isinstance(text, str):
    raise TypeError(f"the skeleton must be a str; got {type(text).__name__}")
  if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 1:
    raise ValueError(f"max_points must be an int >= 1; got {max_points!r}")
  lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
  numbered = any(_marker(line) for line in lines)
  points: list[list[str]] = []  # each point's lines
  numbers: list[int | None] = []  # each point's number (None: a bullet)
  seen: dict[int, int] = {}  # number -> index in points
  replaced: set[int] = set()  # empty points that a later one with their number replaced
  current: list[str] | None = None  # the point continued by plain lines; None before any
  dropped = blank = False  # inside a duplicate point / a blank line since the last text
  last, indent = 0, None  # the last number seen; the first bullet's indent (bullet lists)

  def start(n: int | None) -> None:
    nonlocal current, dropped
    if n is not None and n in seen and any(p.strip() for p in points[seen[n]]):
      current, dropped = None, True
      return
    if n is not None and n in seen:
      replaced.add(seen[n])
    current, dropped = [], False
    points.append(current)
    numbers.append(n)
    if n is not None:
      seen[n] = len(points) - 1

  def add(n: int | None, rest: str) -> None:
    """Numbered text: a new point numbered n (None: the current point continues), split inline."""
    nonlocal last
    for i, (k, part) in enumerate(_split_inline(last if n is None else n, rest)):
      if i or n is not None:
        start(k)
        last = k
      if current is not None:
        current.append(part)

  for line in lines:
    if not line.strip():
      blank = True
      continue
    mark = _marker(line) if numbered else None
    bullet = _BULLET.match(line)
    if mark:
      n, rest = mark
      if (again := _marker(rest)) and again[0] == n:  # "1. 1. text": the prefill repeated
        rest = again[1]
      add(n, rest)
    elif bullet and not numbered and (indent is None or len(bullet.group(1)) <= indent):
      indent = len(bullet.group(1)) if indent is None else indent
      start(None)
      current.append(line[bullet.end() :])
    elif current is None and not dropped:
      continue  # leading chatter
    elif blank and not bullet:
      break  # trailing chatter after the list
    else:
      rest = line[bullet.end() :] if bullet else line
      if numbered:
        add(None, rest)
      else:
        current.append(rest)
    blank = False
  texts = [(n, _clean(p)) for i, (n, p) in enumerate(zip(numbers, points)) if i not in replaced]
  return _checked(texts, max_points, text)


def _checked(points: list[tuple[int | None, str]], max_points: int, source: str) -> list[str]:
  """The texts of points [(number as written, None for a bullet; text)], or SkeletonError for
  no points, a point with no text or more than max_points; source: the skeleton's text."""
  found = [text for _, text in points if text]
  if not found:
    snippet = source.strip()
    snippet = snippet if len(snippet) <= 80 else snippet[:77] + "..."
    raise SkeletonError(
      "the skeleton has no points: expected numbered lines such as '1. ...' "
      f"or bullets such as '- ...'; got {snippet!r}"
    )
  if len(found) < len(points):
    i, number = next((i, n) for i, (n, text) in enumerate(points, 1) if not text)
    which = f"point {number}" if number is not None else f"bullet {i}"
    raise SkeletonError(f"skeleton {which} has no text: write the point or remove its line")
  if len(found) > max_points:
    raise SkeletonError(
      f"the skeleton has {len(found)} points, more than max_points={max_points} (--max-points)"
    )
  return found
