"""The cache coprocessor (kvjax.coprocessor): latents read the frozen cache, augment appends
them at the next positions, files and mismatches."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from by_hand import greedy_after
from flax import nnx

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


def cop_dec(base, cop):
  return cpm.decoder(base.graphdef, base.state, cop.cc, cop.params)


def prefilled(base, rows=ROWS, size=32):
  tokens = np.zeros((len(rows), 8), np.int32)
  for b, r in enumerate(rows):
    tokens[b, : len(r)] = r
  _, cache = steps.prefill(
    base.graphdef,
    base.state,
    new_cache(base, len(rows), size),
    jnp.asarray(tokens),
    jnp.asarray([len(r) for r in rows], jnp.int32),
  )
  return cache


def test_copy_latents_equal_a_cache_free_forward_over_prefix_and_soft_tokens(base):
  """A copied coprocessor reading the base's cache of a prefix computes what the same weights
  compute over [embed(prefix); soft] in one cache-free forward, at the soft positions."""
  cop = cp.init(base, N, seed=3)
  cache = prefilled(base)
  got = cpm.latents_of(cop_dec(base, cop), cop.soft, cache)
  assert got.shape == (2, N, base.cfg.d_model)
  dec = cop_dec(base, cop)  # the base's layers (copied) and embedding, its own output norm
  for b, r in enumerate(ROWS):
    x = jnp.concatenate([dec.embed_tokens(jnp.asarray([r])), cop.soft[None]], axis=1)
    out, _ = dec(embeds=x, logits=False)
    np.testing.assert_allclose(got[b], out.hidden[0, len(r) :], atol=2e-5)


@pytest.mark.parametrize("init", ["copy", "scratch"])
def test_augment_appends_the_latents_in_the_next_slots(base, init):
  """The latents fill the next N slots, all at the next token's position + latent_offset
  (default -33: 32 behind the last token); the prefix is untouched and the next token keeps
  the position it has without augmentation. Expected values from cache-free forwards: the
  base over [embed(prefix); latents; embed(next)] at positions [0 .. n-1, n - 33 (N times),
  n], causal in slot order, gives the K/V of the latents' slots and the next token's logits;
  a copied coprocessor's latents come from its own cache-free forward over
  [embed(prefix); soft], a scratch one's (whose layers read the base's K/V, which no
  cache-free forward of its own reproduces) from `latents`."""
  cop = cp.init(base, N, init=init, seed=1)
  cache = prefilled(base)
  before = jax.tree.map(np.array, cache)
  lat = cp.latents(base, cop, cache)  # [B, N, D]
  aug = cp.augment(base, cop, cache)
  nxt = jnp.asarray([[1], [1]])
  logits, after = steps.extend(
    base.graphdef, base.state, jax.tree.map(jnp.copy, aug), nxt, jnp.asarray([1, 1], jnp.int32)
  )
  np.testing.assert_array_equal(aug.length, [len(r) + N for r in ROWS])
  for b, r in enumerate(ROWS):
    n = len(r)
    np.testing.assert_array_equal(
      aug.pos[b, : n + N], list(range(n)) + [n + cpm.LATENT_POSITION] * N
    )
    np.testing.assert_array_equal(aug.k[:, b, :, :n], before.k[:, b, :, :n])  # prefix untouched
    prefix = jnp.asarray([r])
    latents = (
      _copy_latents(base.graphdef, base.state, cop.cc, cop.params, prefix)
      if init == "copy"
      else lat[b : b + 1]
    )
    ref = _base_forward(
      base.graphdef, base.state, prefix, latents, nxt[b : b + 1], cop.cc.latent_offset
    )
    np.testing.assert_allclose(aug.k[:, b, :, n : n + N], ref.k[:, 0, :, n : n + N], atol=2e-5)
    np.testing.assert_allclose(aug.v[:, b, :, n : n + N], ref.v[:, 0, :, n : n + N], atol=2e-5)
    # decoding goes on after the latents: the next token sits at slot n + N, position n
    assert after.pos[b, n + N] == n and after.length[b] == n + N + 1
    np.testing.assert_allclose(logits[b], ref.logits[0, -1], atol=1e-4)


@functools.partial(jax.jit, static_argnames=("graphdef", "cc"))
def _copy_latents(graphdef, state, cc, params, prefix):
  """A copied coprocessor, cache-free, over [embed(prefix); soft] (prefix [1, n]) -> its
  hidden states at the soft tokens [1, N, D]."""
  n = prefix.shape[1]
  x = jnp.concatenate(
    [nnx.merge(graphdef, state).embed_tokens(prefix), params["soft"][None]], axis=1
  )  # [1, n + N, D]
  own, _ = cpm.decoder(graphdef, state, cc, params)(embeds=x, logits=False)
  return own.hidden[:, n:]


@functools.partial(jax.jit, static_argnames=("graphdef", "offset"))
def _base_forward(graphdef, state, prefix, latents, nxt, offset):
  """The base, cache-free, over [embed(prefix); latents; embed(nxt)] (prefix [1, n], latents
  [1, N, D], nxt [1, 1]) at positions [0 .. n-1, n + offset (N times), n], causal in slot
  order -> its Output (K/V [L, 1, K, T, H], logits [1, T, V])."""
  dec, n, N = nnx.merge(graphdef, state), prefix.shape[1], latents.shape[1]
  x = jnp.concatenate([dec.embed_tokens(prefix), latents, dec.embed_tokens(nxt)], axis=1)
  T = x.shape[1]  # n + N + 1
  pos = jnp.concatenate([jnp.arange(n), jnp.full((N,), n + offset), jnp.asarray([n])])
  out, _ = dec(
    embeds=x,
    positions=pos[None].astype(jnp.int32),
    mask=jnp.tril(jnp.ones((1, T, T), bool)),
    return_kv=True,
  )
  return out


def test_latents_depend_on_the_prefix(base):
  cop = cp.init(base, N)
  a = cpm.latents_of(cop_dec(base, cop), cop.soft, prefilled(base, [ROWS[0]]))
  b = cpm.latents_of(cop_dec(base, cop), cop.soft, prefilled(base, [ROWS[0][:-1] + [9]]))
  assert not np.allclose(a, b, atol=1e-4)


def test_save_load_and_mismatch(base, tmp_path):
  cop = cp.init(base, N, seed=2)
  cp.save(cop, str(tmp_path / "c"))
  back = cp.load(str(tmp_path / "c"), base)
  assert back.cc == cop.cc
  for a, b in zip(jax.tree.leaves(cop.params), jax.tree.leaves(back.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  other = tiny.model("llama", n_layers=3)
  with pytest.raises(cp.CoprocessorError, match="n_layers 2 \\(model: 3\\)"):
    cp.load(str(tmp_path / "c"), other)
  with pytest.raises(cp.CoprocessorError, match="made for another base"):
    cp.augment(other, cop, prefilled(other))
  with pytest.raises(cp.CoprocessorError, match=r"no coprocessor\.json"):
    cp.load(str(tmp_path), base)


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_latent_counts(base, n):
  with pytest.raises(cp.CoprocessorError, match="n_latents must be an int >= 1"):
    cp.init(base, n)


def test_augment_needs_room(base):
  cop = cp.init(base, N)
  cache = prefilled(base, size=10)  # the 8-token row has 2 free slots, 4 latents need 4
  with pytest.raises(
    cp.CoprocessorError, match="has 10 slots; augmenting its longest row needs 12"
  ):
    cp.augment(base, cop, cache)
  with pytest.raises(cp.CoprocessorError, match="init must be one of"):
    cp.init(base, N, init="bogus")


def test_generate_with_a_coprocessor_is_the_augmented_greedy_path(base):
  """coprocessor.generate equals doing it by hand: prefill all but the prompt's last
  token, augment, feed the last token, then greedy decoding; rows of different lengths."""
  cop = cp.init(base, N, seed=5)
  got = cp.generate(base, cop, ROWS, max_new_tokens=6, stop_tokens=[])
  for b, r in enumerate(ROWS):
    cache = prefilled(base, [r[:-1]] if len(r) > 1 else [[0]], size=64)
    cache = cp.augment(base, cop, cache)
    assert got.tokens[b] == greedy_after(base, cache, r[-1], 6)


def test_generate_with_delayed_latents(base):
  """delay k: the first k tokens are the plain greedy ones (the latents are not there yet);
  after them the latents read from the prompt's cache are inserted."""
  cop = cp.init(base, N, seed=6)
  plain = lm.generate(base, ROWS, max_new_tokens=8, stop_tokens=[])
  for k in (1, 3):
    got = cp.generate(base, cop, ROWS, max_new_tokens=8, delay=k, stop_tokens=[])
    for b, r in enumerate(ROWS):
      assert got.tokens[b][:k] == plain.tokens[b][:k]
      cache = prefilled(base, [r[:-1]], size=64)
      lat = cp.latents(base, cop, cache)
      fed = [r[-1]] + plain.tokens[b][: k - 1]
      logits, cache = steps.extend(
        base.graphdef, base.state, cache, jnp.asarray([fed]), jnp.asarray([k], jnp.int32)
      )
      cache = cp.insert(base, cop, lat, cache)
      logits, cache = steps.decode_step(
        base.graphdef, base.state, cache, jnp.asarray([got.tokens[b][k - 1]], jnp.int32)
      )
      assert got.tokens[b][k] == int(np.argmax(logits[0]))


def test_no_coprocessor_leaves_generation_unchanged(base):
  """Augmenting is opt-in: prefill=None is plain generation, bit for bit, and the base's
  params are untouched by making and using a coprocessor."""
  before = jax.tree.map(np.array, base.params())
  plain = lm.generate(base, ROWS, max_new_tokens=6)
  cop = cp.init(base, N, seed=7)
  cp.generate(base, cop, ROWS, max_new_tokens=6, delay=1)
  again = lm.generate(base, ROWS, max_new_tokens=6, prefill=None)
  assert again.tokens == plain.tokens
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, base.params()))
  with pytest.raises(TypeError, match="coprocessor"):  # the spelling removed in 0.2.0
    lm.generate(base, ROWS, max_new_tokens=6, coprocessor=cop, delay=2)
  with pytest.raises(ValueError, match="delay 6 >= max_new_tokens 6"):
    cp.generate(base, cop, ROWS, max_new_tokens=6, delay=6)
  with pytest.raises(TypeError, match=r"cop must be a kvjax\.coprocessor\.Coprocessor"):
    cp.generate(base, "shakespeare-16", ROWS)


def test_lora_and_pause_kinds(base, tmp_path):
  """LoRA starts as the copy (b = 0) and stores only its deltas; pause tokens are the
  latents themselves; both save and load."""
  copy, lora = cp.init(base, N, seed=1), cp.init(base, N, init="lora", lora_rank=4, seed=1)
  cache = prefilled(base)
  np.testing.assert_allclose(
    cp.latents(base, lora, cache), cp.latents(base, copy, cache), atol=1e-5
  )
  assert "blocks" not in lora.params and lora.params["lora"]["attn"]["q"]["a"].shape[-1] == 4
  pause = cp.init(base, N, kind="pause", seed=2)
  assert set(pause.params) == {"soft"} and pause.cc.init == "none"
  np.testing.assert_array_equal(cp.latents(base, pause, cache)[1], pause.soft)
  for name, c in (("lora", lora), ("pause", pause)):
    cp.save(c, str(tmp_path / name))
    back = cp.load(str(tmp_path / name), base)
    assert back.cc == c.cc
    jax.tree.map(
      np.testing.assert_array_equal,
      jax.tree.map(np.asarray, c.params),
      jax.tree.map(np.asarray, back.params),
    )


def test_latents_start_at_the_embedding_scale(base):
  cop = cp.init(base, N)
  lat = np.asarray(cp.latents(base, cop, prefilled(base)))
  emb = np.sqrt(np.mean(np.asarray(base.params()["embed"]) ** 2))
  assert 0.5 * emb < np.sqrt(np.mean(lat**2)) < 2 * emb
