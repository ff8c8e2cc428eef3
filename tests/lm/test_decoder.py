"""The one forward: layer ranges, input embeddings, explicit positions and masks, captures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import lm
from kvjax.cache import KVCache
from kvjax.lm import tiny


@pytest.fixture(scope="module")
def dec():
  return tiny.model("gemma2", seed=1, n_layers=4, windows=(4, 0, 4, 0)).decoder


def tokens(n, seed=0, batch=1):
  return jnp.asarray(np.random.RandomState(seed).randint(2, 258, (batch, n)), jnp.int32)


def empty_cache(dec, batch=1, size=32):
  c = dec.cfg
  return KVCache.init(
    n_layers=c.n_layers, batch=batch, size=size, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim
  )


def test_layer_ranges_chain_to_the_full_forward(dec):
  x = tokens(10)
  full, _ = dec(x, return_layer_inputs=True)
  low, _ = dec(x, layers=(0, 2))
  assert low.logits is None
  np.testing.assert_allclose(low.hidden, full.layer_inputs[2], atol=1e-5)
  high, _ = dec(hidden=low.hidden, layers=(2, 4))
  np.testing.assert_allclose(high.logits, full.logits, atol=1e-5)


def test_layer_ranges_fill_one_cache(dec):
  """[0, 2) then [2, 4) on the same tokens leave the cache a full forward leaves."""
  x = tokens(6)
  _, ref = dec(x, cache=empty_cache(dec))
  low, c = dec(x, cache=empty_cache(dec), layers=(0, 2))
  assert int(c.length[0]) == 0  # only a range that ends at the top advances the length
  _, c = dec(hidden=low.hidden, cache=c, layers=(2, 4))
  assert int(c.length[0]) == 6
  np.testing.assert_allclose(c.k, ref.k, atol=1e-6)
  np.testing.assert_allclose(c.v, ref.v, atol=1e-6)


def test_embeds_input_equals_tokens(dec):
  x = tokens(8)
  ref, _ = dec(x)
  got, _ = dec(embeds=dec.embed_tokens(x))
  np.testing.assert_allclose(got.logits, ref.logits, atol=1e-6)


def test_return_kv_is_what_the_cache_stores(dec):
  x = tokens(5)
  out, c = dec(x, cache=empty_cache(dec), return_kv=True)
  np.testing.assert_allclose(c.k[:, :, :, :5], out.k, atol=0)
  np.testing.assert_allclose(c.v[:, :, :, :5], out.v, atol=0)
  assert c.pos[0, :6].tolist() == [0, 1, 2, 3, 4, -1]


def test_explicit_causal_mask_equals_default(dec):
  x = tokens(7)
  ref, _ = dec(x)
  got, _ = dec(x, mask=jnp.tril(jnp.ones((1, 7, 7), bool)))
  np.testing.assert_allclose(got.logits, ref.logits, atol=1e-6)


def test_tree_mask_scores_each_branch_as_its_own_sequence(dec):
  """A prefix cache plus two sibling branches at equal positions, verified in one pass."""
  prefix, a, b = tokens(6, 1), tokens(2, 2), tokens(2, 3)
  cache = empty_cache(dec)
  _, cache = dec(prefix, cache=cache)
  branch = jnp.concatenate([a, b], axis=1)  # nodes: a0 a1 b0 b1
  positions = 6 + jnp.array([[0, 1, 0, 1]])
  tree = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
  S = cache.size
  mask = jnp.concatenate([jnp.ones((1, 4, S), bool), tree[None]], axis=-1)
  out, _ = dec(branch, cache=cache, positions=positions, mask=mask)
  for seq, rows in ((a, slice(0, 2)), (b, slice(2, 4))):
    ref, _ = dec(jnp.concatenate([prefix, seq], axis=1))
    np.testing.assert_allclose(out.logits[:, rows], ref.logits[:, 6:], atol=1e-5)


def test_explicit_positions(dec):
  """RoPE is relative, so a uniform shift changes nothing and a gap changes the logits; a
  cached run with the same explicit positions equals the full recompute."""
  x = tokens(5)
  base, _ = dec(x)
  shifted, _ = dec(x, positions=jnp.arange(5)[None] + 3)
  np.testing.assert_allclose(shifted.logits, base.logits, atol=1e-5)
  gap = jnp.array([[0, 1, 2, 9, 10]])
  gapped, _ = dec(x, positions=gap)
  assert not np.allclose(base.logits[:, 3:], gapped.logits[:, 3:], atol=1e-4)
  c = empty_cache(dec)
  _, c = dec(x[:, :3], cache=c, positions=gap[:, :3])
  step, _ = dec(x[:, 3:], cache=c, positions=gap[:, 3:])
  np.testing.assert_allclose(step.logits, gapped.logits[:, 3:], atol=1e-5)


def test_sliding_window_limits_attention(dec):
  """With window 4 on local layers, tokens more than 4 back cannot change the last logit
  through those layers alone; a global-only model sees them."""
  cfg = tiny.config("llama", n_layers=2, windows=(3, 3))
  local = lm.init(cfg, seed=0).decoder
  x = tokens(10)
  y = x.at[0, 0].set((x[0, 0] + 1) % 258)
  a, _ = local(x)
  b, _ = local(y)
  # two layers of window 3 reach back 4 tokens: position 9 cannot see position 0
  np.testing.assert_allclose(a.logits[0, 9], b.logits[0, 9], atol=1e-6)
  assert not np.allclose(a.logits[0, 2], b.logits[0, 2], atol=1e-4)


def test_padded_rows_do_not_leak(dec):
  """Row 1's padding (past its n_new) never shows up in row 1's cache length or logits."""
  x = tokens(8, batch=2)
  c = empty_cache(dec, batch=2)
  out, c = dec(x, cache=c, n_new=jnp.array([8, 5]))
  assert c.length.tolist() == [8, 5]
  ref, _ = dec(x[1:, :5])
  np.testing.assert_allclose(out.logits[1, :5], ref.logits[0], atol=1e-5)
  nxt, _ = dec(x[:, :1], cache=c)
  ref2, _ = dec(jnp.concatenate([x[1:, :5], x[1:, :1]], axis=1))
  np.testing.assert_allclose(nxt.logits[1, 0], ref2.logits[0, -1], atol=1e-5)


@pytest.mark.parametrize("renormalize", [True, False])
def test_experts_route_and_both_forms_equal_every_expert_dense(renormalize):
  """`route` keeps the k largest of the softmax over all E experts (before the top-k, so
  without renormalisation the k weights sum to below 1, as Qwen3-MoE's norm_topk_prob=False
  has it); the grouped (ragged dot) and gathered forms equal every expert evaluated densely
  and combined with the routing weights (zero for the experts not chosen). 10 tokens take
  the grouped form, 1 token the gathered one."""
  from flax import nnx

  from kvjax.lm.decoder import MoE, route

  cfg = tiny.config("mixtral", n_experts=6, n_experts_per_tok=3, moe_renormalize=renormalize)
  moe = MoE(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32)
  for w in (moe.router, moe.gate, moe.up, moe.down):
    w[...] = w[...] * 30  # O(1) router logits and expert outputs
  x = jnp.asarray(np.random.RandomState(0).randn(2, 5, cfg.d_model), jnp.float32)
  logits = jnp.einsum("btd,de->bte", x, moe.router[...])
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  weights, experts = route(logits, 3, renormalize)
  top = np.argsort(-probs, axis=-1)[..., :3]
  np.testing.assert_array_equal(np.sort(experts, -1), np.sort(top, -1))
  kept = np.take_along_axis(probs, np.asarray(experts), -1)
  np.testing.assert_allclose(
    weights, kept / kept.sum(-1, keepdims=True) if renormalize else kept, rtol=1e-6
  )
  dense = np.zeros_like(probs)  # [B, T, E]: each expert's weight, 0 where not chosen
  np.put_along_axis(dense, np.asarray(experts), np.asarray(weights), -1)
  h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, moe.gate[...])) * jnp.einsum(
    "btd,edf->btef", x, moe.up[...]
  )
  want = jnp.einsum("btef,efd,bte->btd", h, moe.down[...], dense)
  np.testing.assert_allclose(moe(x), want, atol=1e-4, rtol=1e-5)  # 10 tokens: grouped
  for b in range(2):  # one token, 3 of 6 experts: gathered
    for t in range(5):
      np.testing.assert_allclose(
        moe(x[b : b + 1, t : t + 1])[0, 0], want[b, t], atol=1e-4, rtol=1e-5
      )
