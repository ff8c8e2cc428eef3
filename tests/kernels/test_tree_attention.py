"""The draft-tree attention kernel against its XLA reference, in interpret mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from kvjax.cache.view import CACHE, Keys
from kvjax.lm.attention import KeyBlock, attend
from kvjax.pallas_kernels import splits
from kvjax.pallas_kernels import tree_attention as kernel
from kvjax.pallas_kernels.splits import NEG
from kvjax.pallas_kernels.tree_attention import reference, tree_attention

MODES = {"interpret": True, "tpu-interpret": pltpu.InterpretParams()}


def tree(T, shape, rng):
  """[T, T] bool ancestor-or-self mask and [T] depths of a tree rooted at token 0: a chain, or
  a branching tree (each token's parent drawn among the earlier ones)."""
  parent = [-1] + [i - 1 if shape == "chain" else int(rng.integers(0, i)) for i in range(1, T)]
  mask, depth = np.eye(T, dtype=bool), np.zeros(T, np.int32)
  for i in range(1, T):
    mask[i] |= mask[parent[i]]
    depth[i] = depth[parent[i]] + 1
  return mask, depth


def inputs(B, T, N, K, H, S, shape, dtype, seed=0, lengths=()):
  """A dense-cache row per batch row (filled slots [0, length) at positions 0..length-1, free
  slots holding huge values, NaN and inf, at position -1) and a draft tree after it."""
  rng = np.random.default_rng(seed)
  lengths = list(lengths) + list(rng.integers(0, S + 1, B - len(lengths)))
  length = np.asarray(lengths, np.int32)
  k, v = (rng.standard_normal((B, S, K, H)) for _ in range(2))
  free = np.arange(S)[None] >= length[:, None]  # [B, S]
  for x in (k, v):
    junk = rng.standard_normal(x.shape) * 1e4
    junk.reshape(-1)[::97] = np.nan
    junk.reshape(-1)[5::89] = np.inf
    x[free] = junk[free]
  pos = np.where(free, -1, np.arange(S)[None]).astype(np.int32)
  masks, depths = zip(*(tree(T, shape, rng) for _ in range(B)))
  q_pos = length[:, None] + np.stack(depths)
  q, k_new, v_new = (rng.standard_normal((B, T, n, H)) for n in (N, K, K))
  cast = lambda x: jnp.asarray(x, dtype)
  k, v, k_new, v_new = (x.transpose(0, 2, 1, 3) for x in (k, v, k_new, v_new))  # [B, K, S, H]
  return (
    cast(q),
    cast(k),
    cast(v),
    jnp.asarray(length),
    cast(k_new),
    cast(v_new),
    jnp.asarray(q_pos),
    jnp.asarray(pos),
    jnp.asarray(np.stack(masks)),
  )


CASES = [  # B, T, N, K, H, S, tree shape, window, softcap, lengths
  (4, 6, 2, 2, 16, 24, "tree", 0, None, (0, 24, 7, 17)),  # MHA, an empty and a full row
  (3, 5, 8, 2, 16, 21, "chain", 0, None, (21, 0, 13)),  # GQA 4:1, overlapping last block
  (3, 7, 4, 2, 16, 24, "tree", 6, 30.0, (0, 23, 11)),  # sliding window, softcap
  (3, 1, 4, 1, 32, 19, "chain", 0, None, (19, 0, 5)),  # MQA, one token (decode)
]


def run(args, **kw):
  """tree_attention under jit (the interpreter then compiles once rather than op by op)."""
  return jax.jit(functools.partial(tree_attention, **kw))(*args)


@functools.cache
def case_data(case):
  """The inputs, keyword arguments and reference result of a case (shared by both modes)."""
  B, T, N, K, H, S, shape, window, softcap, lengths = case
  args = inputs(B, T, N, K, H, S, shape, jnp.float32, lengths=lengths)
  kw = dict(scale=H**-0.5, window=window, softcap=softcap)
  return args, kw, run(args, impl="xla", **kw)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}N{}K{}H{}S{}{}w{}c{}".format(*c))
def test_kernel_equals_reference(case, mode):
  args, kw, (want_o, want_lse) = case_data(case)
  got_o, got_lse = run(args, impl="pallas", interpret=MODES[mode], block=8, **kw)
  assert np.isfinite(want_o).all() and (np.asarray(want_lse) > NEG).all()  # the diagonal
  np.testing.assert_allclose(got_o, want_o, atol=1e-5)
  np.testing.assert_allclose(got_lse, want_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_long_cache(mode):
  """A long, odd-sized cache (S = 8203 > 8192, H = 128, GQA 2:1, rows filled to 8203 and 5000)
  with the default blocks: 17 key splits per (row, kv head), the last one past S, and chunks
  past a row's length skipped."""
  args = inputs(2, 5, 4, 2, 128, 8203, "tree", jnp.float32, seed=5, lengths=(8203, 5000))
  want_o, want_lse = run(args, scale=128**-0.5, impl="xla")
  got_o, got_lse = run(args, scale=128**-0.5, impl="pallas", interpret=MODES[mode])
  np.testing.assert_allclose(got_o, want_o, atol=2e-5)
  np.testing.assert_allclose(got_lse, want_lse, atol=2e-5, rtol=1e-6)


def test_bfloat16():
  """bf16 cache and queries, f32 scores and accumulation; TPU semantics only (to save time:
  the generic interpreter is covered in f32)."""
  args = inputs(2, 6, 8, 2, 32, 20, "tree", jnp.bfloat16, seed=1, lengths=(20, 6))
  want_o, want_lse = run(args, scale=32**-0.5, impl="xla")
  got_o, got_lse = run(
    args, scale=32**-0.5, impl="pallas", interpret=MODES["tpu-interpret"], block=8
  )
  assert got_o.dtype == got_lse.dtype == jnp.float32
  np.testing.assert_allclose(got_o, want_o, atol=3e-2)
  np.testing.assert_allclose(got_lse, want_lse, atol=3e-2)


def test_reference_equals_attention_over_the_concatenated_keys():
  """The reference against a direct construction: the filled slots and the tree tokens as one
  key sequence with a full boolean mask (ancestry, sliding window), plain softmax in float64.
  The window is traced, as under the decoder's scan over layers."""
  B, T, N, K, H, S, window, cap = 3, 6, 4, 2, 16, 12, 5, 20.0
  args = inputs(B, T, N, K, H, S, "tree", jnp.float32, seed=2, lengths=(0, 12, 7))
  fn = jax.jit(functools.partial(reference, scale=0.3, softcap=cap))
  o, lse = fn(*args, window=jnp.int32(window))
  q, k, v, length, k_new, v_new, q_pos, pos, tree_mask = (np.asarray(x) for x in args)
  k, v, k_new, v_new = (x.transpose(0, 2, 1, 3) for x in (k, v, k_new, v_new))  # [B, S, K, H]
  for b in range(B):
    n = length[b]
    keys = np.concatenate([k[b, :n], k_new[b]]).astype(np.float64)  # [n + T, K, H]
    vals = np.concatenate([v[b, :n], v_new[b]]).astype(np.float64)
    k_pos = np.concatenate([pos[b, :n], q_pos[b]])
    vis = np.concatenate([np.ones((T, n), bool), tree_mask[b]], axis=1)
    vis &= q_pos[b][:, None] - k_pos[None] < window  # [T, n + T]
    for h in range(N):
      sc = q[b, :, h].astype(np.float64) @ keys[:, h // (N // K)].T * 0.3
      sc = np.where(vis, np.tanh(sc / cap) * cap, -np.inf)
      e = np.exp(sc - sc.max(-1, keepdims=True))
      np.testing.assert_allclose(
        o[b, :, h], e @ vals[:, h // (N // K)] / e.sum(-1)[:, None], atol=1e-5
      )
      np.testing.assert_allclose(lse[b, :, h], np.log(np.exp(sc).sum(-1)), atol=1e-5)


def test_partial_merges_through_attend():
  """(o, lse) is a partial softmax for `attend(partial=...)`: the tree's own keys from the
  kernel (every row empty) merged with the cache as an explicit block give the whole."""
  args = inputs(3, 5, 4, 2, 16, 16, "tree", jnp.float32, seed=3, lengths=(16, 3, 9))
  q, k, v, length, _, _, q_pos, pos, _ = args

  @jax.jit
  def both(args):
    whole, _ = tree_attention(*args, scale=0.25)
    only_tree = tree_attention(q, k, v, jnp.zeros_like(length), *args[4:], scale=0.25)
    filled = jnp.arange(16)[None] < length[:, None]  # [B, S]
    keys = Keys(CACHE, 0, filled, q_pos, pos)
    cache = KeyBlock(q, jnp.nan_to_num(k), jnp.nan_to_num(v), keys)
    return attend([cache], scale=0.25, partial=only_tree), whole

  merged, whole = both(args)
  np.testing.assert_allclose(merged, whole, atol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("shape", [(2, 8, 8, 2, 64, 252), (1, 60, 32, 8, 128, 1024)])
def test_kernel_lowers_for_the_device(platform, shape):
  """The kernel lowers to Mosaic TPU and to Triton from this CPU machine (jax.export; the
  device compiler itself runs only on the device)."""
  B, T, N, K, H, S = shape
  q = jax.ShapeDtypeStruct((B, T, N, H), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((B, K, S, H), jnp.bfloat16)
  new = jax.ShapeDtypeStruct((B, K, T, H), jnp.bfloat16)
  ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  launch = splits.Launch(tpu=platform == "tpu", interpret=False, block=128, steps=kernel.STEPS)
  fn = functools.partial(kernel._pallas, scale=0.1, softcap=None, launch=launch)
  triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
  exported = export.export(jax.jit(fn), platforms=[platform], disabled_checks=[triton])(
    q,
    k,
    k,
    ints(B),
    new,
    new,
    ints(B, T),
    ints(B, S),
    jax.ShapeDtypeStruct((B, T, T), jnp.bool_),
    window=ints(),
  )
  assert ("tpu_custom_call" if platform == "tpu" else "xla.gpu.triton") in exported.mlir_module()


def test_errors():
  args = inputs(2, 3, 4, 2, 16, 8, "chain", jnp.float32)
  q, k, v, length, k_new, _, q_pos, _, tree_mask = args
  with pytest.raises(ValueError, match=r"tree_mask must be a bool array of shape \(2, 3, 3\)"):
    tree_attention(*args[:8], tree_mask[:, :2, :2], scale=0.25)
  with pytest.raises(ValueError, match="multiple of K"):
    tree_attention(q[:, :, :3], *args[1:], scale=0.25)
  with pytest.raises(ValueError, match="impl must be one of"):
    tree_attention(*args, scale=0.25, impl="triton")
  with pytest.raises(ValueError, match=r"k_new and v_new must both be \[B, K, T, H\]"):
    tree_attention(*args[:4], k_new[:, :, :2], *args[5:], scale=0.25)
  with pytest.raises(ValueError, match=r"q_pos must be an int array of shape \(2, 3\)"):
    tree_attention(*args[:6], q_pos.astype(jnp.float32), *args[7:], scale=0.25)
  with pytest.raises(ValueError, match=r"length must be an int array of shape \(2,\)"):
    tree_attention(q, k, v, length[:1], *args[4:], scale=0.25)
