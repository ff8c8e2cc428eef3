"""Jitted model steps over an explicit cache: `step(graphdef, state, cache, ...) -> (..., cache)`.

Every step donates the cache. Shapes are static, so callers pad prompts to length buckets.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.cache.dense import KVCache
from kvjax.lm.sampling import Sampling, sample

# AOT-compiled executables shared by every Model: two models of one config, dtype and layout
# (two loads of a checkpoint, a DroidSpeak sender and receiver, a fine-tune and its base) have
# equal graphdefs, so each program compiles once per process. Least recently used beyond
# EXECUTABLES_KEPT are dropped.
EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
EXECUTABLES_KEPT = 256
compilations = 0  # programs compiled by `call` in this process (tests count them)


def call(model, fn, *args, **static) -> tuple[Any, float]:
  """Calls jitted step `fn(model.graphdef, model.state, *args, **static)` through an
  AOT-compiled executable (kept in `model.compiled` and shared through `EXECUTABLES` with every
  model of the same graphdef), so timings never include compilation.
  Returns (result, seconds spent compiling in this call)."""
  global compilations
  operands = (model.state, *args)
  leaves, tree = jax.tree.flatten(operands)
  key = (
    fn,
    tuple(sorted(static.items())),
    tree,
    tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves),
  )
  compile_s = 0.0
  if key not in model.compiled:
    shared = (key, model.graphdef)
    if shared not in EXECUTABLES:
      t0 = time.perf_counter()
      EXECUTABLES[shared] = fn.lower(model.graphdef, *operands, **static).compile()
      compile_s = time.perf_counter() - t0
      compilations += 1
      while len(EXECUTABLES) > EXECUTABLES_KEPT:
        EXECUTABLES.popitem(last=False)
    EXECUTABLES.move_to_end(shared)
    model.compiled[key] = EXECUTABLES[shared]
  return model.compiled[key](*operands), compile_s


def timed(model, fn, *args, **static) -> tuple[Any, float, float]:
  """`call`, waiting for its result: (result, seconds it ran, compilation excluded, seconds
  spent compiling in this call)."""
  t0 = time.perf_counter()
  out, compile_s = call(model, fn, *args, **static)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0 - compile_s, compile_s


def bucket(n: int, minimum: int = 16, step: int = 512) -> int:
  """The padded size for n: the next power of two (at least `minimum`) up to `step`, then the
  next multiple of `step` (padding wastes < step slots: a long prompt is not padded to twice
  its length, and few shapes still need compiling)."""
  size = minimum
  while size < min(n, step):
    size *= 2
  return size if size >= n else -(-n // step) * step


@functools.partial(jax.jit, static_argnames=("graphdef",))
def score(graphdef, state, tokens: jax.Array) -> jax.Array:
  """tokens [B, T] -> logits [B, T, V] float32: full recompute, no cache."""
  out, _ = nnx.merge(graphdef, state)(tokens)
  return out.logits


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def prefill(graphdef, state, cache: KVCache, tokens: jax.Array, lengths: jax.Array):
  """Fills an empty cache. tokens [B, P] right-padded, lengths [B] real tokens per row (>= 1)
  -> (logits [B, V] at each row's last real token, cache with row b holding lengths[b]).

  Runs the cache-free forward (attention over the P prompt tokens only, not the S empty
  slots) and writes its K/V into the cache once."""
  dec = nnx.merge(graphdef, state)
  out, _ = dec(tokens, logits=False, return_kv=True)
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
  cache = cache.write(out.k, out.v, positions, lengths)
  last = jnp.take_along_axis(out.hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return dec.logits(last), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def extend(graphdef, state, cache, tokens: jax.Array, n_new: jax.Array):
  """Feeds a chunk into any cache: tokens [B, C] right-padded, n_new [B] real tokens per row
  (>= 1) -> (logits [B, V] at each row's last real token, cache n_new longer per row)."""
  dec = nnx.merge(graphdef, state)
  out, cache = dec(tokens, cache=cache, n_new=n_new, logits=False)
  last = jnp.take_along_axis(out.hidden, (n_new - 1)[:, None, None], axis=1)[:, 0]
  return dec.logits(last), cache


def nonfinite(logits: jax.Array) -> jax.Array:
  """logits [B, ..., V] -> [B] bool: the row holds a NaN or an infinity (its sample would be
  garbage). Loops carry it out so the host checks once per call (`engine.check_finite`)."""
  return ~jnp.isfinite(logits).reshape(logits.shape[0], -1).all(axis=-1)


def _decode(dec, cache: KVCache, tokens: jax.Array):
  out, cache = dec(tokens[:, None], cache=cache)
  return out.logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, state, cache: KVCache, tokens: jax.Array):
  """tokens [B] -> (logits [B, V] for the next position, cache one token longer per row)."""
  return _decode(nnx.merge(graphdef, state), cache, tokens)


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling"), donate_argnames=("cache",))
def sample_decode(
  graphdef, state, cache, logits: jax.Array, key: jax.Array, step: jax.Array, *, sampling: Sampling
):
  """One streamed token in one dispatch: samples from logits [B, V] (PRNG fold_in(key, step),
  as decode_loop's step `step`) and feeds the token -> (tokens [B], bad [B] the logits it
  sampled from were not finite, logits [B, V] for the position after it, cache one token
  longer per row)."""
  tok = sample(logits, jax.random.fold_in(key, step), sampling)
  bad = nonfinite(logits)
  logits, cache = _decode(nnx.merge(graphdef, state), cache, tok)
  return tok, bad, logits, cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
  """The carry of the decode `while_loop`. step: [] int32 steps taken in this call; logits
  [B, V] for each row's next token; cache; out [B, max_steps] int32 tokens emitted (0 once a
  row is done); done [B] bool; counts [B] int32 tokens each row emitted, calls before included;
  bad [B] bool a live row sampled from logits that were not finite."""

  step: jax.Array
  logits: jax.Array
  cache: Any
  out: jax.Array
  done: jax.Array
  counts: jax.Array
  bad: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Decoded:
  """What `decode_loop` and `decode_more` return.

  tokens: [B, max_steps] int32 the tokens of this call's steps (0 once a row is done; row b's
    are its first counts[b] columns for a call that started at counts 0).
  counts: [B] int32 tokens each row has emitted, earlier calls and a stop token included.
  done: [B] bool the row finished (a stop token or its budget).
  bad: [B] bool a live row sampled from logits that were not finite in this call.
  logits: [B, V] each row's logits for its next token (what a further call starts from).
  cache: the donated cache, each row as long as its tokens fed.
  """

  tokens: jax.Array
  counts: jax.Array
  done: jax.Array
  bad: jax.Array
  logits: jax.Array
  cache: Any


@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampling", "max_steps"), donate_argnames=("cache",)
)
def decode_loop(
  graphdef,
  state,
  cache: KVCache,
  logits: jax.Array,
  key: jax.Array,
  n_steps: jax.Array,
  stop_ids: jax.Array,
  *,
  sampling: Sampling,
  max_steps: int,
) -> Decoded:
  """Samples up to n_steps (<= max_steps) tokens per row in one `lax.while_loop`.

  logits [B, V]: the prefill's. A row stops after emitting a token in stop_ids [E] (E >= 1;
  pad with -1). Returns `Decoded` (tokens [B, max_steps], counts [B] tokens per row, the stop
  token included).
  """
  B = logits.shape[0]
  carry = _start(logits, cache, jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), max_steps)
  budget = jnp.broadcast_to(n_steps, (B,))
  return _loop(nnx.merge(graphdef, state), carry, key, jnp.int32(0), budget, stop_ids, sampling)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "sampling", "max_steps"), donate_argnames=("cache",)
)
def decode_more(
  graphdef,
  state,
  cache,
  logits: jax.Array,
  key: jax.Array,
  start: jax.Array,
  done: jax.Array,
  counts: jax.Array,
  budget: jax.Array,
  stop_ids: jax.Array,
  *,
  sampling: Sampling,
  max_steps: int,
) -> Decoded:
  """Resumable decode_loop with a budget per row: runs at most max_steps more steps, from
  global step `start` (the PRNG stream continues: several calls sample what one call would).

  done [B] rows already finished, counts [B] tokens they emitted so far, budget [B] the most
  tokens a row may emit. A row finishes at a stop token or when counts reaches its budget.
  Returns `Decoded` of these steps (its logits and cache are what the next call takes).
  """
  carry = _start(logits, cache, done, counts, max_steps)
  return _loop(nnx.merge(graphdef, state), carry, key, start, budget, stop_ids, sampling)


def _start(
  logits: jax.Array, cache, done: jax.Array, counts: jax.Array, max_steps: int
) -> DecodeState:
  """The carry before a call's first step: logits [B, V], cache, done [B], counts [B] as
  given; no step taken, no token out, no row bad yet."""
  B = logits.shape[0]
  return DecodeState(
    step=jnp.int32(0),
    logits=logits,
    cache=cache,
    out=jnp.zeros((B, max_steps), jnp.int32),
    done=done,
    counts=counts,
    bad=jnp.zeros((B,), bool),
  )


def _loop(dec, s: DecodeState, key, start, budget, stop_ids, sampling) -> Decoded:
  """Runs the decode `while_loop` from carry s (out sized [B, max_steps]) until every row is
  done or max_steps steps were taken; step i samples with PRNG fold_in(key, start + i)."""
  max_steps = s.out.shape[1]

  def cond(s: DecodeState):
    return (s.step < max_steps) & ~jnp.all(s.done)

  def body(s: DecodeState) -> DecodeState:
    tok = sample(s.logits, jax.random.fold_in(key, start + s.step), sampling)
    counts = s.counts + (~s.done).astype(jnp.int32)
    done = s.done | jnp.any(tok[:, None] == stop_ids[None, :], axis=-1) | (counts >= budget)
    logits, cache = _decode(dec, s.cache, tok)
    return DecodeState(
      step=s.step + 1,
      logits=logits,
      cache=cache,
      out=s.out.at[:, s.step].set(jnp.where(s.done, 0, tok)),
      done=done,
      counts=counts,
      bad=s.bad | (~s.done & nonfinite(s.logits)),
    )

  s = jax.lax.while_loop(cond, body, dataclasses.replace(s, done=s.done | (s.counts >= budget)))
  return Decoded(
    tokens=s.out, counts=s.counts, done=s.done, bad=s.bad, logits=s.logits, cache=s.cache
  )


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits [..., V], targets [...] int -> nll [...] float32 of each target."""
  logits = logits.astype(jnp.float32)
  target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target


@functools.partial(jax.jit, static_argnames=("graphdef", "last"))
def nll(graphdef, state, tokens: jax.Array, targets: jax.Array, *, last: bool = False):
  """Cache-free nll of targets [B, T] after tokens [B, T] -> [B, T] float32; with last=True,
  targets [B] of the last position only -> [B] (the LM head runs on that position alone)."""
  dec = nnx.merge(graphdef, state)
  if not last:
    return token_nll(dec(tokens)[0].logits, targets)
  out, _ = dec(tokens, logits=False)
  return token_nll(dec.logits(out.hidden[:, -1]), targets)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def nll_chunk(graphdef, state, cache, tokens: jax.Array, targets: jax.Array, n_new: jax.Array):
  """Feeds a chunk into any cache in one forward: tokens [B, C] right-padded, n_new [B] real
  tokens per row -> (nll [B, C] float32 of targets [B, C] (padding scored, to be dropped),
  cache n_new longer per row). Every cache evicts per token inside a chunk, so this equals
  `nll_scan` over the same tokens (one decode step each)."""
  dec = nnx.merge(graphdef, state)
  out, cache = dec(tokens, cache=cache, n_new=n_new)
  return token_nll(out.logits, targets), cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def nll_scan(graphdef, state, cache, tokens: jax.Array, targets: jax.Array):
  """Feeds tokens [B, C] one at a time (C decode steps in one `lax.scan`) into any cache
  (KVCache or SinkCache) -> (nll [B, C] float32 of targets [B, C], cache)."""
  dec = nnx.merge(graphdef, state)

  def body(cache, xs):
    tok, tgt = xs
    logits, cache = _decode(dec, cache, tok)
    return cache, token_nll(logits, tgt)

  cache, out = jax.lax.scan(body, cache, (tokens.T, targets.T))
  return out.T, cache
