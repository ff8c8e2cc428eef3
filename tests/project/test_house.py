"""House rules that no linter checks: every function is short enough to read at once.

Read from the source with ast (nothing imported): the package, benchmarks/ and tests/.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAX_LINES = 80  # from the `def` line to the last line, decorators excluded, as formatted
SKIP = {".venv", ".git", "site", "build", "__pycache__", ".ruff_cache"}


def sources() -> list[str]:
  out = []
  for dirpath, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in SKIP and not d.endswith(".egg-info")]
    out += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
  return sorted(out)


def long_functions(path: str, limit: int = MAX_LINES) -> list[str]:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  return [
    f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.name} has "
    f"{node.end_lineno - node.lineno + 1} lines (at most {limit})"
    for node in ast.walk(tree)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    and node.end_lineno - node.lineno + 1 > limit
  ]


def test_sources_are_found():
  names = {os.path.relpath(p, ROOT) for p in sources()}
  assert {"lm/decoder.py", "benchmarks/decode.py", "tests/project/test_house.py"} <= names


def test_no_function_is_longer_than_80_lines():
  bad = [line for path in sources() for line in long_functions(path)]
  assert not bad, "\n".join(bad)


def test_the_check_catches_a_long_function(tmp_path):
  body = "\n".join(f"  x{i} = {i}" for i in range(MAX_LINES))
  path = tmp_path / "long.py"
  path.write_text(f"def short():\n  return 1\n\n\ndef long():\n{body}\n")
  with pytest.raises(AssertionError, match="long has 81 lines"):
    bad = long_functions(str(path))
    assert not bad, "\n".join(bad)
