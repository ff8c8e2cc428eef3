"""Coprocessor training (kvjax.train.coprocessor): the one-pass multi-trace loss equals
augmenting trace by trace through the inference path, the base never changes, resume,
errors."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import coprocessor as cp
from kvjax.coprocessor import model as cpm
from kvjax.coprocessor import traces
from kvjax.lm import steps, tiny
from kvjax.lm.generate import new_cache
from kvjax.train import coprocessor as ct
from kvjax.train.lm import TrainError

N, A, T = 3, 4, 24


@pytest.fixture(scope="module")
def base():
  return tiny.model("llama", n_layers=2)


def rows(seed=0, B=2, vocab=200):
  rng = np.random.default_rng(seed)
  return rng.integers(2, vocab, (B, T + 1)).astype(np.int32)


def batch_of(w):
  return {"inputs": w[:, :-1], "targets": w[:, 1:], "mask": np.ones((len(w), T), np.float32)}


def trace_nll(base, cop, row, p, delay):
  """The inference path for one trace: prefill x_<p, compute the latents, feed `delay`
  tokens, insert the latents, then the A ahead tokens -> nll [A] of their next tokens."""
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :p] = row[:p]
  _, cache = steps.prefill(
    base.graphdef,
    base.state,
    new_cache(base, 1, 64),
    jnp.asarray(tokens),
    jnp.asarray([p], jnp.int32),
  )
  lat = cp.latents(base, cop, cache)
  if delay:
    _, cache = steps.extend(
      base.graphdef,
      base.state,
      cache,
      jnp.asarray([row[p : p + delay]]),
      jnp.asarray([delay], jnp.int32),
    )
  cache = cp.insert(base, cop, lat, cache)
  q = p + delay
  logits = _ahead_logits(base.graphdef, base.state, cache, jnp.asarray([row[q : q + A]]))
  return np.asarray(steps.token_nll(logits[0], jnp.asarray(row[q + 1 : q + A + 1])))


@functools.partial(jax.jit, static_argnames="graphdef")
def _ahead_logits(graphdef, state, cache, tokens):
  return nnx.merge(graphdef, state)(tokens, cache=cache)[0].logits


@functools.partial(jax.jit, static_argnames=("graphdef", "cc", "delay"))
def one_pass(graphdef, state, cc, params, batch, points, *, delay=0):
  """multi_trace, jitted (eager, it dispatches op by op)."""
  return traces.multi_trace(
    nnx.merge(graphdef, state),
    cpm.decoder(graphdef, state, cc, params),
    params["soft"],
    batch,
    points,
    ahead=A,
    delay=delay,
    latent_offset=cc.latent_offset,
  )


def perturbed(cop, scale=0.05, seed=7):
  """cop with every trainable leaf (soft tokens, norm, blocks or both LoRA factors) moved by
  scale * N(0, 1) noise from a fixed key: no factor stays zero or constant, so the latents
  genuinely depend on the prefix they read (LoRA's b = 0, or one constant added to every
  weight, makes its latents all but independent of the cache)."""
  return cop.with_params(_noised(cop.params, scale, seed))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _noised(params, scale: float, seed: int):
  """params + scale * N(0, 1) noise, leaf i's drawn from fold_in(key(seed), i) (one program,
  not one per leaf and operation)."""
  leaves, tree = jax.tree.flatten(params)
  key = jax.random.key(seed)
  return jax.tree.unflatten(
    tree,
    [
      a + scale * jax.random.normal(jax.random.fold_in(key, i), a.shape, a.dtype)
      for i, a in enumerate(leaves)
    ],
  )


@pytest.mark.parametrize(
  "kind,init,delay,offset",
  [("coprocessor", "copy", 0, -1), ("coprocessor", "lora", 2, -1), ("pause", "copy", 1, -9)],
)
def test_one_pass_equals_trace_by_trace(base, kind, init, delay, offset):
  """Every trace of the one-pass forward equals the inference path run for that trace alone
  (prefill x_<p, latents, delay tokens, insert, ahead tokens), with params perturbed so that
  each case reads the cache: a coprocessor's latents change with the prefix they read."""
  cop = perturbed(cp.init(base, N, kind=kind, init=init, latent_offset=offset, seed=4))
  w = rows()
  points = np.array([[1, 9, 17], [3, 11, 16]], np.int32)
  if kind == "coprocessor":  # the latents of x_<9 and of x_<10 differ: the cache is read
    lat = [
      cp.latents(
        base,
        cop,
        steps.prefill(
          base.graphdef,
          base.state,
          new_cache(base, 1, 32),
          jnp.asarray(w[:1, :16]),
          jnp.asarray([p], jnp.int32),
        )[1],
      )
      for p in (9, 10)
    ]
    assert np.abs(np.asarray(lat[0]) - np.asarray(lat[1])).max() > 1e-2
  got = one_pass(
    base.graphdef,
    base.state,
    cop.cc,
    cop.params,
    jax.tree.map(jnp.asarray, batch_of(w)),
    jnp.asarray(points),
    delay=delay,
  )
  plain = np.asarray(
    steps.nll(base.graphdef, base.state, jnp.asarray(w[:, :-1]), jnp.asarray(w[:, 1:]))
  )
  for b in range(2):
    for j, p in enumerate(points[b]):
      q = p + delay
      n = min(A, T - q)
      np.testing.assert_allclose(
        got["nll_aug"][b, j, :n], trace_nll(base, cop, w[b], p, delay)[:n], atol=2e-4
      )
      np.testing.assert_allclose(got["nll_base"][b, j, :n], plain[b, q : q + n], atol=2e-4)
      np.testing.assert_array_equal(got["valid"][b, j], np.arange(A) < n)


def test_packed_documents_stay_apart(base):
  """With segment ids, a trace reads only its own document: tokens of an earlier document
  in the row change nothing, and targets of the next document do not count."""
  cop = cp.init(base, N, seed=1)
  w = rows(3, B=1)
  seg = np.where(np.arange(T) < 10, 1, 2)[None].astype(np.int32)
  pos = np.where(np.arange(T) < 10, np.arange(T), np.arange(T) - 10)[None].astype(np.int32)
  b1 = {**batch_of(w), "segment_ids": seg, "positions": pos}
  b1["mask"][0, 9] = 0  # input 9 -> target 10 crosses the boundary (as kvjax.train.data marks)
  w2 = w.copy()
  w2[0, :10] = (w2[0, :10] + 7) % 200  # another first document
  b2 = {**b1, "inputs": w2[:, :-1], "targets": w2[:, 1:]}
  pts = jnp.asarray([[8, 13]], jnp.int32)

  def run(b, at=pts):
    return one_pass(base.graphdef, base.state, cop.cc, cop.params, jax.tree.map(jnp.asarray, b), at)

  g1, g2 = run(b1), run(b2)
  np.testing.assert_allclose(g1["nll_aug"][0, 1], g2["nll_aug"][0, 1], atol=1e-5)
  np.testing.assert_array_equal(g1["valid"][0, 0], [1, 0, 0, 0])  # inputs 10, 11: document 2
  # and the second-document trace equals the same document alone in its own row
  alone = np.full((1, T + 1), 5, np.int32)
  alone[0, : T + 1 - 10] = w[0, 10:]
  g3 = run(batch_of(alone), jnp.asarray([[3, 4]], jnp.int32))
  np.testing.assert_allclose(g1["nll_aug"][0, 1], g3["nll_aug"][0, 0], atol=1e-4)


def _batches(B, seed=0):
  """The same rows at every step (the points differ), so a few steps can fit them."""

  def gen(start):
    while True:
      yield batch_of(rows(seed, B))

  return gen


def test_training_lowers_the_loss_and_leaves_the_base_unchanged(base, tmp_path):
  before = jax.tree.map(np.array, base.params())
  cop = cp.init(base, N)
  ac = ct.AugmentConfig(
    steps=8,
    batch_size=2,
    seq_len=T,
    ahead=A,
    points=4,
    lr=4e-3,
    out_dir=str(tmp_path / "run"),
    log_every=1,
    eval_every=4,
    eval_batches=1,
  )
  held = [batch_of(rows(99, 2))]
  res = ct.train(base, cop, ac, _batches(2), lambda: held, progress=False)
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, base.params()))
  first, last = res.records[0], res.records[-1]
  assert last["loss"] < first["loss"] and last["loss"] < last["base_loss"] - 0.02
  assert "eval_reduction_1" in res.records[-1] and "eval_base_loss" in res.records[-1]
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), cop.params, res.coprocessor.params)
  assert all(jax.tree.leaves(changed))
  assert (tmp_path / "run" / "loss.png").exists()
  # resume: an interrupted run (the iterator runs dry after 4 batches), then on to 8, ends
  # bit-identical with the uninterrupted run
  first = dataclasses.replace(ac, out_dir=str(tmp_path / "r2"), save_every=4)
  gen = _batches(2)
  with pytest.raises(TrainError, match="ended before step 5"):
    ct.train(base, cop, first, lambda s: (b for _, b in zip(range(4 - s), gen(s))), progress=False)
  again = ct.train(base, cop, first, _batches(2), progress=False)
  assert again.resumed_from == 4
  jax.tree.map(np.testing.assert_array_equal, res.coprocessor.params, again.coprocessor.params)


def test_by_position_matches_the_training_metric(base):
  cop = cp.init(base, N, seed=2)
  w = np.concatenate([rows(5, 3), np.full((1, T + 1), -1, np.int32)])
  got = traces.by_position(base, cop, w, ahead=A, points=4, batch_size=2)
  assert got.ppl_base.shape == (A,) and np.all(got.targets == 12)
  assert np.all(np.isfinite(got.relative_reduction))
  j = got.to_json()
  assert len(j["relative_reduction_by_position"]) == A


def test_errors(base, tmp_path):
  with pytest.raises(TrainError, match="ahead \\(24\\) must be smaller than seq_len \\(24\\)"):
    ct.AugmentConfig(steps=2, batch_size=1, seq_len=T, ahead=T, out_dir="x")
  with pytest.raises(TrainError, match="30 points need 30 distinct positions"):
    ct.AugmentConfig(steps=2, batch_size=1, seq_len=T, ahead=A, points=30, out_dir="x")
  with pytest.raises(TrainError, match="ahead must be an int >= 1"):
    ct.AugmentConfig(steps=2, batch_size=1, seq_len=T, ahead=0, out_dir="x")
  other = tiny.model("llama", n_layers=3)
  ac = ct.AugmentConfig(
    steps=2, batch_size=2, seq_len=T, ahead=A, points=2, out_dir=str(tmp_path / "e")
  )
  with pytest.raises(cp.CoprocessorError, match="made for another base"):
    ct.train(other, cp.init(base, N), ac, _batches(2), progress=False)
