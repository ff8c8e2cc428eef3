"""The package's imports run one way (DESIGN.md): kernels -> caches -> the lm core -> the methods
-> training -> the command lines. Read from the source with ast, so it needs nothing imported.

A module may import its own layer or a lower one. Only the command-line layer imports inside
functions (to keep `--help` fast); elsewhere every kvjax import is at module level, so no
import can hide a cycle. No module imports another module's private (`_`) name.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("pallas_kernels", "cache", "lm", "speculative", "coprocessor", "train")
KERNELS, CACHES, CORE, METHODS, TRAINING, CLI = range(6)
NAMES = ("kernels", "caches", "lm core", "methods", "training", "command lines")
# Modules of a folder that sit above the folder's own layer, by dotted-name prefix.
LAYERS = {
  "kvjax.pallas_kernels": KERNELS,
  "kvjax.cache": CACHES,
  "kvjax.lm": CORE,
  "kvjax.lm.streaming": METHODS,
  "kvjax.lm.sot": METHODS,
  "kvjax.lm.droidspeak": METHODS,
  "kvjax.speculative": METHODS,
  "kvjax.coprocessor": METHODS,
  "kvjax.train": TRAINING,
  "kvjax.lm.cli": CLI,
  "kvjax.train.cli": CLI,
  "kvjax.train.__main__": CLI,
  "kvjax.__main__": CLI,
  "kvjax": CLI,  # the root package's own __init__ (its public surface)
}


def layer(module: str) -> int:
  """The layer of a dotted module name: its longest prefix in LAYERS."""
  parts = module.split(".")
  for n in range(len(parts), 0, -1):
    name = ".".join(parts[:n])
    if name in LAYERS and (n > 1 or module == "kvjax"):
      return LAYERS[name]
  raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def modules() -> dict[str, str]:
  """Dotted name -> path of every module of the package."""
  out = {
    "kvjax": os.path.join(ROOT, "__init__.py"),
    "kvjax.__main__": os.path.join(ROOT, "__main__.py"),
  }
  for pkg in PACKAGES:
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
      rel = os.path.relpath(dirpath, ROOT).replace(os.sep, ".")
      if "__pycache__" in rel:
        continue
      for f in files:
        if f.endswith(".py"):
          name = f"kvjax.{rel}" + ("" if f == "__init__.py" else f".{f[:-3]}")
          out[name] = os.path.join(dirpath, f)
  return out


def read(path: str) -> str:
  with open(path) as f:
    return f.read()


def _type_checking(node: ast.AST) -> bool:
  return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str, path: str):
  """(target module, imported names, line, at module level) of each kvjax import of a module;
  imports under `if TYPE_CHECKING:` are annotations only and left out."""
  tree = ast.parse(read(path), path)
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  top = set()
  for node in tree.body:
    top.add(node)
    if isinstance(node, (ast.If, ast.Try)) and not _type_checking(node):
      top.update(ast.walk(node))
  skip = {n for node in tree.body if _type_checking(node) for n in ast.walk(node)}
  for node in ast.walk(tree):
    if node in skip:
      continue
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("kvjax"):
          yield alias.name, [], node.lineno, node in top
    elif isinstance(node, ast.ImportFrom):
      target = node.module or ""
      if node.level:
        base = package.split(".")
        target = ".".join(base[: len(base) - node.level + 1] + ([target] if target else []))
      if target.startswith("kvjax"):
        yield target, [a.name for a in node.names], node.lineno, node in top


def resolved(target: str, names: list[str], known: dict[str, str]) -> list[str]:
  """The modules an import reaches: `from pkg import mod` imports the submodule pkg.mod."""
  subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
  return subs or [target]


def test_every_module_has_a_layer():
  for name in modules():
    layer(name)


def test_imports_run_one_way():
  known = modules()
  bad = []
  for name, path in known.items():
    mine = layer(name)
    for target, names, line, at_top in imports(name, path):
      for mod in resolved(target, names, known):
        if layer(mod) > mine:
          bad.append(
            f"{os.path.relpath(path, ROOT)}:{line}: {name} ({NAMES[mine]}) imports "
            f"{mod} ({NAMES[layer(mod)]})"
          )
      if not at_top and mine != CLI:
        bad.append(
          f"{os.path.relpath(path, ROOT)}:{line}: {name} imports {target} inside a "
          "function (only the command lines may)"
        )
  assert not bad, "\n".join(bad)


def module_aliases(path: str, known: dict[str, str]) -> dict[str, str]:
  """Local name -> kvjax module, for every name a module binds to another kvjax module."""
  out = {}
  for node in ast.walk(ast.parse(read(path), path)):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kvjax"):
      for a in node.names:
        if f"{node.module}.{a.name}" in known:
          out[a.asname or a.name] = f"{node.module}.{a.name}"
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("kvjax") and a.asname:
          out[a.asname] = a.name
  return out


def test_no_private_name_crosses_a_module():
  """Neither `from kvjax.x import _name` nor `x._name` on another kvjax module."""
  known = modules()
  bad = []
  for name, path in known.items():
    where = os.path.relpath(path, ROOT)
    for target, names, line, _ in imports(name, path):
      for n in names:
        if n.startswith("_") and f"{target}.{n}" not in known:
          bad.append(f"{where}:{line}: {name} imports {target}.{n}")
    aliases = module_aliases(path, known)
    for node in ast.walk(ast.parse(read(path), path)):
      if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in aliases
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
      ):
        bad.append(f"{where}:{node.lineno}: {name} uses {aliases[node.value.id]}.{node.attr}")
  assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
  "source, check, expect",
  [
    (
      "from kvjax.train import corpus\n",
      "test_imports_run_one_way",
      "imports kvjax.train.corpus (training)",
    ),
    (
      "from kvjax.pallas_kernels import splits\ndef f():\n  from kvjax.cache import view\n",
      "test_imports_run_one_way",
      "inside a function",
    ),
    (
      "from kvjax.cache.view import _private\n",
      "test_no_private_name_crosses_a_module",
      "imports kvjax.cache.view._private",
    ),
    (
      "from kvjax.cache import view\nx = view._private\n",
      "test_no_private_name_crosses_a_module",
      "uses kvjax.cache.view._private",
    ),
  ],
)
def test_the_checks_catch_a_violation(tmp_path, monkeypatch, source, check, expect):
  """Each check fails on a violation planted in a cache module (none can pass vacuously)."""
  path = tmp_path / "planted.py"
  path.write_text(source)
  real = modules()
  monkeypatch.setitem(globals(), "modules", lambda: {**real, "kvjax.cache.planted": str(path)})
  with pytest.raises(AssertionError, match=expect.replace("(", r"\(").replace(")", r"\)")):
    globals()[check]()
