"""The cache coprocessor (kvjax.coprocessor): latents read the frozen cache, augment appends
them at the next positions, files and mismatches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import coprocessor as cp
from kvjax import lm
from kvjax.coprocessor import model as cpm
from kvjax.lm import steps, tiny
from kvjax.lm.generate import new_cache

N = 4
ROWS = [[5, 9, 12, 40, 7, 7, 100, 3], [44, 2, 90]]


@pytest.fixture(scope="module")
def base():
  return tiny.model("llama", n_layers=2)


def prefilled(base, rows=ROWS, size=32):
  tokens = np.zeros((len(rows), 8), np.int32)
  for b, r in enumerate(rows):
    tokens[b, :len(r)] = r
  _, cache = steps.prefill(base.graphdef, base.state, new_cache(base, len(rows), size),
                           jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32))
  return cache


def test_copy_latents_equal_a_cache_free_forward_over_prefix_and_soft_tokens(base):
  """A copied coprocessor reading the base's cache of a prefix computes what the same weights
  compute over [embed(prefix); soft] in one cache-free forward, at the soft positions."""
  cop = cp.init(base, N, seed=3)
  cache = prefilled(base)
  got = cpm.latents_of(cop.decoder.decoder, cop.soft, cache)
  assert got.shape == (2, N, base.cfg.d_model)
  dec = base.decoder
  for b, r in enumerate(ROWS):
    x = jnp.concatenate([dec.embed_tokens(jnp.asarray([r])), cop.soft[None]], axis=1)
    out, _ = dec(embeds=x, logits=False)
    np.testing.assert_allclose(got[b], out.hidden[0, len(r):], atol=2e-5)


def test_augment_appends_the_latents_at_the_next_positions(base):
  cop = cp.init(base, N, init="scratch", seed=1)
  cache = prefilled(base)
  before = jax.tree.map(np.array, cache)
  latents = cpm.latents_of(cop.decoder.decoder, cop.soft, cache)
  aug = cp.augment(base, cop, cache)
  np.testing.assert_array_equal(aug.length, [len(r) + N for r in ROWS])
  want = cpm.augment_with(base.decoder, latents, jax.tree.map(jnp.asarray, before))
  for b, r in enumerate(ROWS):
    n = len(r)
    np.testing.assert_array_equal(aug.pos[b, :n + N], np.arange(n + N))
    np.testing.assert_array_equal(aug.k[:, b, :n], before.k[:, b, :n])   # prefix untouched
    np.testing.assert_allclose(aug.k[:, b, n:n + N], want.k[:, b, n:n + N], atol=1e-5)
    np.testing.assert_allclose(aug.v[:, b, n:n + N], want.v[:, b, n:n + N], atol=1e-5)
  # decoding goes on after the latents: the next token sits at position length + N
  logits, after = steps.extend(base.graphdef, base.state, aug, jnp.asarray([[1], [1]]),
                               jnp.asarray([1, 1], jnp.int32))
  assert after.pos[0, len(ROWS[0]) + N] == len(ROWS[0]) + N and np.isfinite(logits).all()


def test_latents_depend_on_the_prefix(base):
  cop = cp.init(base, N)
  a = cpm.latents_of(cop.decoder.decoder, cop.soft, prefilled(base, [ROWS[0]]))
  b = cpm.latents_of(cop.decoder.decoder, cop.soft, prefilled(base, [ROWS[0][:-1] + [9]]))
  assert not np.allclose(a, b, atol=1e-4)


def test_save_load_and_mismatch(base, tmp_path):
  cop = cp.init(base, N, seed=2)
  cp.save(cop, str(tmp_path / "c"))
  back = cp.load(str(tmp_path / "c"), base)
  assert back.cc == cop.cc
  for a, b in zip(jax.tree.leaves(cop.params()), jax.tree.leaves(back.params())):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = tiny.model("llama", n_layers=3)
  with pytest.raises(cp.CoprocessorError, match="n_layers 2 \\(model: 3\\)"):
    cp.load(str(tmp_path / "c"), other)
  with pytest.raises(cp.CoprocessorError, match="made for another base"):
    cp.augment(other, cop, prefilled(other))
  with pytest.raises(cp.CoprocessorError, match="no coprocessor.json"):
    cp.load(str(tmp_path), base)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_latent_counts(base, n):
  with pytest.raises(cp.CoprocessorError, match="n_latents must be an int >= 1"):
    cp.init(base, n)


def test_augment_needs_room(base):
  cop = cp.init(base, N)
  cache = prefilled(base, size=10)  # the 8-token row has 2 free slots, 4 latents need 4
  with pytest.raises(cp.CoprocessorError, match="has 10 slots; augmenting its longest row "
                                                "needs 12"):
    cp.augment(base, cop, cache)
  with pytest.raises(cp.CoprocessorError, match="init must be one of"):
    cp.init(base, N, init="lora")
