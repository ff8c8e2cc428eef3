"""Artifact directories: a JSON config beside orbax params, the shipped ones loadable by name.

Each kind of artifact (bundled models, EAGLE heads, coprocessors; next LoRA adapters and
cached GGUF conversions) is a `Kind`: a small declarative description (its noun, config file,
shipped folder, error class) that the functions here read and write alike:

    HEADS = artifact.Kind(noun="head", config="head.json", shipped_in=..., error=HeadError)
    path, shipped = HEADS.locate("shakespeare")  # a directory, or a shipped name
    hc = HEADS.read_config(path, HeadConfig.from_json)
    HEADS.check_fingerprint(hc.target_fingerprint, target, path=path, allow=False)
    params = HEADS.restore(path, like)

An artifact trained against a model's params records their `params_fingerprint`; using it with
other params of the same architecture (a fine-tune) is refused unless allowed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import typing
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import config
from kvjax.lm.checkpoint import CheckpointError, restore_params, save_params
from kvjax.lm.config import Config
from kvjax.lm.hf_config import read_json

PARAMS = "params"  # the orbax params' folder inside an artifact directory
ALLOW_FLAG = "allow_other_params=True (--allow-other-params)"


def config_to_json(cfg: Any) -> dict[str, Any]:
  """An artifact's config (a frozen dataclass) as its JSON object: every field by name, the
  architecture it was made for (a `Config` field) as `config.to_dict`, tuples as lists."""
  out = {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if isinstance(v, Config):
      v = config.to_dict(v)
    elif isinstance(v, tuple):
      v = list(v)
    elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
      v = int(v)
    out[f.name] = v
  return out


def config_from_json(cls: type, d: dict[str, Any]) -> Any:
  """The inverse of `config_to_json`: an artifact config of class `cls` from the fields d
  holds, a `Config` field through `config.from_dict` and lists as tuples. A field d lacks
  takes its default (KeyError for one without); keys that are not fields are ignored."""
  types = typing.get_type_hints(cls)
  kw = {}
  for f in dataclasses.fields(cls):
    if f.name not in d:
      if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        raise KeyError(f.name)
      continue
    v = d[f.name]
    kw[f.name] = (
      config.from_dict(v) if types[f.name] is Config else (tuple(v) if isinstance(v, list) else v)
    )
  return cls(**kw)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
  """noun: what one artifact is called in messages ("head"). config: its JSON config's file
  name, whose presence marks a shipped directory. shipped_in: the folder holding one directory
  per shipped name. error: the exception its problems raise. holds: what a directory holds,
  for messages (default "<config> + params/"). shipped_as: "shipped" or "bundled"."""

  noun: str
  config: str
  shipped_in: str
  error: type[Exception]
  holds: str = ""
  shipped_as: str = "shipped"

  def shipped(self) -> tuple[str, ...]:
    """Names of the shipped artifacts of this kind, sorted."""
    if not os.path.isdir(self.shipped_in):
      return ()
    return tuple(
      sorted(
        n
        for n in os.listdir(self.shipped_in)
        if os.path.isfile(os.path.join(self.shipped_in, n, self.config))
      )
    )

  def locate(self, path: str) -> tuple[str, bool]:
    """(directory, is_shipped) of a directory or shipped name; a directory that exists wins
    over a shipped name. Neither: FileNotFoundError listing what is shipped."""
    path = os.fspath(path)
    if os.path.isdir(path):
      return path, False
    names = self.shipped()
    if path in names:
      return os.path.join(self.shipped_in, path), True
    holds = self.holds or f"{self.config} + {PARAMS}/"
    listed = ", ".join(repr(n) for n in names) or "none"
    raise FileNotFoundError(
      f"{path!r} is not a {self.noun} directory ({holds}) or a {self.shipped_as} "
      f"{self.noun} name ({self.shipped_as}: {listed})"
    )

  def read_config(self, path: str, parse: Callable[[dict[str, Any]], Any]) -> Any:
    """parse(the JSON object in directory path's config file); a missing or unreadable file,
    or a config that parse finds fields missing or mistyped in, raise `error` naming it."""
    file = os.path.join(path, self.config)
    d = read_json(file, required=True, error=self.error)
    try:
      return parse(d)
    except (KeyError, TypeError) as err:
      raise self.error(f"{file}: not a {self.noun} config ({type(err).__name__}: {err})") from None

  def save(self, path: str, config: dict[str, Any], params: Any, *, dtype=None) -> None:
    """Writes the config file and params/ (orbax; cast to `dtype` when given, e.g. bfloat16 to
    ship) into directory `path`, whose params/ must not exist yet."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, self.config), "w") as f:
      json.dump(config, f, indent=2)
    save_params(os.path.join(path, PARAMS), params, dtype=dtype)

  def restore(self, path: str, like: Any) -> Any:
    """The params in directory path's params/, shaped and typed like `like`; a missing folder
    or one that does not match raises `error` naming each mismatched param."""
    try:
      return restore_params(os.path.join(path, PARAMS), like)
    except CheckpointError as err:
      raise self.error(str(err)) from None

  def check_fingerprint(self, recorded: str, model: Any, *, path: str, allow: bool) -> None:
    """The artifact in `path` was trained against params with fingerprint `recorded` (""
    when not recorded: nothing to check) and is used with `model`: `error` when the model's
    params differ, or with allow a warning."""
    if not recorded:
      return
    got = params_fingerprint(model)
    if got == recorded:
      return
    name = f" {model.path}" if model.path else ""
    msg = (
      f"the {self.noun} {path} was trained against other params (fingerprint "
      f"{recorded[:12]}...) than this model's{name} ({got[:12]}...): the same architecture "
      "with other weights, e.g. a fine-tune"
    )
    if not allow:
      raise self.error(f"{msg}; pass {ALLOW_FLAG} to use it anyway")
    warnings.warn(f"{msg}; using it anyway", stacklevel=3)


def params_fingerprint(model: Any, *, sample: int = 4096) -> str:
  """A short digest of a model's params (`model.params()`) that artifacts trained against them
  record (EAGLE heads, coprocessors): every leaf's path and shape and up to `sample` evenly
  strided values rounded to bfloat16, so the same weights loaded in float32 or bfloat16 give
  the same digest and a fine-tune of the same architecture another. Reads sample x leaves
  values, not the params."""
  h = hashlib.sha256()
  for path, leaf in sorted(
    jax.tree_util.tree_leaves_with_path(model.params()), key=lambda pl: jax.tree_util.keystr(pl[0])
  ):
    flat = jnp.ravel(leaf)
    step = max(1, flat.size // sample)
    picked = np.asarray(flat[::step][:sample].astype(jnp.bfloat16).astype(jnp.float32))
    h.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
    h.update(picked.tobytes())
  return h.hexdigest()[:32]
