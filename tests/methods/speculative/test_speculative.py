"""EAGLE speculative decoding: trees, lossless acceptance, the jitted loop against vanilla."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from kvjax import lm, speculative
from kvjax.lm import steps as lm_steps
from kvjax.lm import tiny
from kvjax.lm.generate import new_cache
from kvjax.lm.sampling import Sampling
from kvjax.speculative import accept as acc
from kvjax.speculative import decoding, verify
from kvjax.speculative import head as hd
from kvjax.speculative import tree as tr
from kvjax.speculative.generate import sizes
from kvjax.speculative.tree import TreeSpec

PROMPTS = ["Hello there, friend", "ab", "The quick brown fox jumps", "x"]


@pytest.fixture(scope="module")
def model():
  return tiny.model("llama", n_layers=2)


@pytest.fixture(scope="module")
def head(model):
  return speculative.init_head(model, "eagle1", seed=1)


def hand_tree():
  """top_k 2, depth 3: 10 candidates, of which the best 6 (scores in brackets) are kept:
  root ─ 10 [-.1] ─ 20 [-.2] ─ 30 [-.3]
       └ 11 [-.5] ─ 22 [-.6] ─ 32 [-.7]"""
  spec = TreeSpec(top_k=2, depth=3, total_tokens=7)
  tokens = [10, 11, 20, 21, 22, 23, 30, 31, 32, 33]
  scores = [-0.1, -0.5, -0.2, -1.0, -0.6, -2.0, -0.3, -3.0, -0.7, -4.0]
  parents = [-1, -1, 0, 0, 1, 1, 2, 2, 4, 4]
  arr = lambda x, d: jnp.asarray([x], d)
  return spec, tr.build(
    jnp.asarray([7]),
    arr(tokens, jnp.int32),
    arr(scores, jnp.float32),
    arr(parents, jnp.int32),
    spec,
  )


def test_tree_structure_by_hand():
  _, t = hand_tree()
  assert t.tokens[0].tolist() == [7, 10, 11, 20, 22, 30, 32]
  assert t.parent[0].tolist() == [-1, 0, 0, 1, 2, 3, 4]
  assert t.depth[0].tolist() == [0, 1, 1, 2, 2, 3, 3]
  want = np.zeros((7, 7), bool)
  for i, anc in enumerate([[0], [0, 1], [0, 2], [0, 1, 3], [0, 2, 4], [0, 1, 3, 5], [0, 2, 4, 6]]):
    want[i, anc] = True
  np.testing.assert_array_equal(t.mask[0], want)
  assert t.paths[0].tolist() == [
    [0, -1, -1, -1],
    [0, 1, -1, -1],
    [0, 2, -1, -1],
    [0, 1, 3, -1],
    [0, 2, 4, -1],
    [0, 1, 3, 5],
    [0, 2, 4, 6],
  ]
  assert t.children[0].tolist() == [[1, 2], [3, -1], [4, -1], [5, -1], [6, -1], [-1, -1], [-1, -1]]


def test_tree_spec_errors():
  with pytest.raises(ValueError, match="top_k must be an int >= 1"):
    TreeSpec(top_k=0)
  with pytest.raises(ValueError, match="total_tokens must be >= 2"):
    TreeSpec(total_tokens=1)
  with pytest.raises(ValueError, match="more than the root plus the 3 candidates"):
    TreeSpec(top_k=1, depth=3, total_tokens=5)
  TreeSpec(top_k=1, depth=3, total_tokens=4)  # a full chain


def emitted(tree, path, m, bonus):
  """The first two tokens a round emits: drafts on the accepted path, then the bonus."""
  tok = lambda i: jnp.take_along_axis(tree.tokens, path[:, i : i + 1], 1)[:, 0]
  first = jnp.where(m >= 1, tok(1), bonus)
  second = jnp.where(m >= 2, tok(2), jnp.where(m == 1, bonus, -1))
  return np.asarray(first), np.asarray(second), np.asarray(path[:, 1])


def chi2_p(samples, p):
  counts = np.bincount(samples, minlength=len(p))
  p = np.asarray(p, np.float64)
  keep = p > 0
  assert counts[~keep].sum() == 0, "sampled a token of probability 0"
  return stats.chisquare(counts[keep], p[keep] / p[keep].sum() * counts.sum()).pvalue


def test_sampling_acceptance_is_lossless():
  """Over a hand tree with arbitrary target distributions, the first emitted token follows p
  at the root and the second follows p at the first token's node; a scheme that forgets to
  zero rejected siblings fails the same bound."""
  _, t = hand_tree()
  V = 40
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.full(V, 0.3), size=(1, 7)).astype(np.float32)
  probs[0, 0, [10, 11]] += 0.3  # make the drafts likely enough to be accepted often
  probs[0, 1, 20] += 0.5
  probs /= probs.sum(-1, keepdims=True)
  N = 60_000
  tree = jax.tree.map(lambda a: jnp.repeat(a, N, 0), t)
  path, m, bonus = jax.jit(acc.accept, static_argnums=3)(
    tree, jnp.repeat(jnp.asarray(probs), N, 0), jax.random.key(1), False
  )
  first, second, node1 = emitted(tree, path, m, bonus)
  assert chi2_p(first, probs[0, 0]) > 1e-3
  via = first == 10  # emitted 10 (node 1) either accepted or as a bonus
  assert via.mean() > 0.2 and (m >= 2).mean() > 0.05
  assert chi2_p(second[via & (node1 == 1)], probs[0, 1]) > 1e-3
  # the same bound rejects a scheme that samples the bonus from p instead of the residual
  u = rng.random((N, 3))
  p0 = probs[0, 0].astype(np.float64)
  p0 /= p0.sum()
  wrong = np.where(
    u[:, 0] < p0[10], 10, np.where(u[:, 1] < p0[11], 11, rng.choice(V, size=N, p=p0))
  )
  assert chi2_p(wrong, p0) < 1e-6


def test_greedy_acceptance_takes_the_argmax_path():
  _, t = hand_tree()
  V = 40
  probs = np.full((1, 7, V), 1.0 / V, np.float32)
  logits = jnp.asarray(np.log(probs))
  logits = logits.at[0, 0, 11].set(5.0).at[0, 2, 22].set(5.0).at[0, 4, 3].set(5.0)
  p = acc.target_probs(logits, Sampling())
  path, m, bonus = acc.accept(t, p, jax.random.key(0), True)
  assert path[0].tolist() == [0, 2, 4, 4] and int(m[0]) == 2 and int(bonus[0]) == 3


def oracle(monkeypatch, rows, correct_levels):
  """Makes every drafted tree's first-child chain follow `rows` (each row's reference token
  sequence) for correct_levels[b] levels and then go wrong, so rounds accept many tokens."""
  F = np.zeros((len(rows), 512), np.int32)
  for b, r in enumerate(rows):
    F[b, : len(r)] = r
  F, good = jnp.asarray(F), jnp.asarray(correct_levels)
  orig = decoding._draft

  def draft(dec, head, hcache, h, logits, root, spec):
    tree, hc = orig(dec, head, hcache, h, logits, root, spec)
    n, B = hcache.length, root.shape[0]
    b = jnp.arange(B)
    toks, node = tree.tokens, jnp.zeros((B,), jnp.int32)
    for d in range(1, spec.depth + 1):
      child = tree.children[b, node, 0]
      want = F[b, n + d]
      want = jnp.where(d <= good, want, (want + 1) % 258)
      c = jnp.maximum(child, 0)
      toks = toks.at[b, c].set(jnp.where(child >= 0, want, toks[b, c]))
      node = jnp.where(child >= 0, child, node)
    return dataclasses.replace(tree, tokens=toks), hc

  monkeypatch.setattr(decoding, "_draft", draft)


@pytest.mark.parametrize(
  "spec",
  [TreeSpec(top_k=1, depth=4, total_tokens=5), TreeSpec(top_k=3, depth=4, total_tokens=12)],
  ids=["chain", "tree"],
)
def test_greedy_tree_equals_vanilla_batch4(model, head, monkeypatch, spec):
  """Rows of different prompt lengths accept different numbers of tokens per round (an oracle
  makes the drafts partly right); the output equals vanilla greedy token for token."""
  ref = lm.generate(model, PROMPTS, max_new_tokens=29, stop_tokens=[])
  oracle(monkeypatch, [p + t for p, t in zip(ref.prompt_tokens, ref.tokens)], [4, 1, 2, 3])
  out = speculative.generate(model, head, PROMPTS, max_new_tokens=29, stop_tokens=[], tree=spec)
  assert out.tokens == ref.tokens
  assert all(len(t) == 29 for t in out.tokens)
  rounds = out.stats["rounds_per_row"]
  assert len(set(rounds)) > 1 and out.stats["mean_accept_len"] > 1.8
  lens = out.stats["accept_lens"]  # per round: the oracle's right levels + the bonus token
  assert [len(a) for a in lens] == rounds
  assert sum(map(sum, lens)) / sum(rounds) == pytest.approx(out.stats["mean_accept_len"])
  if spec.top_k == 1:  # a chain holds every right level up to its depth (the oracle's rows end
    for a, g in zip(lens, [4, 1, 2, 3]):  # at the 29th token: the last round may find fewer)
      assert set(a[:-1]) == {min(g, spec.depth) + 1} and 1 <= a[-1] <= min(g, spec.depth) + 1


def test_stop_tokens_and_limit(model, head, monkeypatch):
  ref = lm.generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[])
  stop = ref.tokens[0][6]  # a token row 0 emits mid-round
  want = lm.generate(model, PROMPTS, max_new_tokens=20, stop_tokens=[stop])
  oracle(monkeypatch, [p + t for p, t in zip(ref.prompt_tokens, ref.tokens)], [4, 4, 4, 4])
  out = speculative.generate(
    model,
    head,
    PROMPTS,
    max_new_tokens=20,
    stop_tokens=[stop],
    tree=TreeSpec(top_k=2, depth=4, total_tokens=8),
  )
  assert out.tokens == want.tokens and out.finish == want.finish
  assert out.finish[0] == "stop_token"


def test_compaction(model, head, monkeypatch):
  """After a round that accepts 3 draft tokens, both caches hold exactly what prefilling the
  accepted sequence gives: the path's K/V in contiguous slots, the head's pairs."""
  prompt = PROMPTS[2]
  ref = lm.generate(model, prompt, max_new_tokens=8, stop_tokens=[])
  seq = ref.prompt_tokens[0] + ref.tokens[0]
  oracle(monkeypatch, [seq], [3])
  spec = TreeSpec(top_k=2, depth=5, total_tokens=9)
  n0 = len(ref.prompt_tokens[0])
  P, S, S_head = sizes(n0, 8, spec)

  def prefilled(tokens):
    B = 1
    toks = np.zeros((B, P), np.int32)
    toks[0, : len(tokens)] = tokens
    cache = new_cache(model, B, S)
    hcache = hd.new_cache(head.hc, B, S_head, model.dtype)
    return decoding.prefill(
      model.graphdef,
      model.state,
      head.state,
      cache,
      hcache,
      jnp.asarray(toks),
      jnp.asarray([len(tokens)], jnp.int32),
      jax.random.key(0),
      head_graphdef=head.graphdef,
      sampling=Sampling(),
    )

  @functools.partial(jax.jit, static_argnames=("graphdef", "head_graphdef"))
  def one_round(graphdef, state, head_graphdef, head_state, front):
    dec, hm = nnx.merge(graphdef, state), nnx.merge(head_graphdef, head_state)
    return decoding.draft_verify(
      dec, hm, front, jax.random.key(0), jnp.ones((1,), bool), spec=spec, sampling=Sampling()
    )

  r = one_round(model.graphdef, model.state, head.graphdef, head.state, prefilled(seq[:n0]))
  assert int(r.m[0]) == 3 and r.emit[0, :4].tolist() == seq[n0 + 1 : n0 + 5]
  n = n0 + 4
  want = prefilled(seq[:n])
  got = r.front
  assert int(got.cache.length[0]) == int(got.hcache.length[0]) == n
  for a, b in ((got.cache, want.cache), (got.hcache, want.hcache)):
    np.testing.assert_array_equal(a.pos[0, :n], b.pos[0, :n])
    np.testing.assert_allclose(a.k[:, 0, :, :n], b.k[:, 0, :, :n], atol=2e-5)
    np.testing.assert_allclose(a.v[:, 0, :, :n], b.v[:, 0, :, :n], atol=2e-5)
  assert int(got.root[0]) == seq[n]
  np.testing.assert_allclose(got.h, want.h, atol=2e-5)


def test_sampled_tokens_follow_the_target(monkeypatch):
  """Temperature 1 on a 12-token model: over 3,000 seeded rows the second and third generated
  tokens (emitted by verification rounds) follow the target's exact marginals."""
  cfg = tiny.config("llama", vocab_size=12, n_layers=1)
  model = lm.init(cfg, seed=3)
  model = model.with_params(
    jax.tree.map(lambda a: a, model.params()) | {"head": model.params()["head"] * 40.0}
  )  # peakier distributions
  head = speculative.init_head(model, "eagle1", seed=2)
  N, prompt = 3000, [3, 5, 7]
  out = speculative.generate(
    model,
    head,
    [prompt] * N,
    max_new_tokens=3,
    stop_tokens=[],
    sampling=Sampling(temperature=1.0),
    key=jax.random.key(7),
    tree=TreeSpec(top_k=3, depth=2, total_tokens=6),
  )
  toks = np.array(out.tokens)
  assert out.stats["mean_accept_len"] > 1.2  # drafts do get accepted
  p1 = jax.nn.softmax(lm.score(model, prompt)[-1])
  rows = [prompt + [a] for a in range(12)]
  p2_given = jax.nn.softmax(lm.score(model, np.array(rows))[:, -1], -1)
  p2 = np.asarray(p1 @ p2_given)
  assert chi2_p(toks[:, 0], np.asarray(p1)) > 1e-3
  assert chi2_p(toks[:, 1], p2) > 1e-3
  rows3 = [prompt + [a, b] for a in range(12) for b in range(12)]
  p3_given = jax.nn.softmax(lm.score(model, np.array(rows3))[:, -1], -1)
  joint = (np.asarray(p1)[:, None] * np.asarray(p2_given)).reshape(-1)
  assert chi2_p(toks[:, 2], np.asarray(joint @ p3_given)) > 1e-3


def test_head_roundtrip_and_mismatch(model, head, tmp_path):
  speculative.save_head(head, str(tmp_path / "h"))
  back = speculative.load_head(str(tmp_path / "h"), model)
  for a, b in zip(jax.tree.leaves(head.params()), jax.tree.leaves(back.params())):
    np.testing.assert_array_equal(a, b)
  other = tiny.model("llama", n_layers=3)
  with pytest.raises(speculative.HeadError, match="n_layers 2 \\(model: 3\\)"):
    speculative.load_head(str(tmp_path / "h"), other)
  with pytest.raises(speculative.HeadError, match="n_layers 2 \\(model: 3\\)"):
    speculative.generate(other, head, "x", max_new_tokens=2)
  with pytest.raises(FileNotFoundError, match="not a head directory"):
    speculative.load_head(str(tmp_path / "nope"), model)
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "head.json").write_text('{"kind": 3')
  with pytest.raises(speculative.HeadError, match=r"head\.json: invalid JSON"):
    speculative.load_head(str(tmp_path / "bad"), model)
  with pytest.raises(speculative.HeadError, match="kind must be one of"):
    hd.HeadConfig(kind="medusa", target=model.cfg)


def test_head_saved_in_bfloat16_loads_in_the_targets_dtype(model, head, tmp_path):
  speculative.save_head(head, str(tmp_path / "h16"), dtype=jnp.bfloat16)
  back = speculative.load_head(str(tmp_path / "h16"), model)
  for a, b in zip(jax.tree.leaves(head.params()), jax.tree.leaves(back.params())):
    assert b.dtype == model.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(a).astype(jnp.bfloat16).astype(np.float32), b)


def test_eagle3_head_runs(model):
  """An eagle3 head (fused layer inputs, own norms) drafts and verifies losslessly too."""
  h3 = speculative.init_head(model, "eagle3", seed=0)
  assert h3.hc.fuse_layers == (0, 1)
  ref = lm.generate(model, PROMPTS[:2], max_new_tokens=12, stop_tokens=[])
  out = speculative.generate(
    model,
    h3,
    PROMPTS[:2],
    max_new_tokens=12,
    stop_tokens=[],
    tree=TreeSpec(top_k=2, depth=3, total_tokens=6),
  )
  assert out.tokens == ref.tokens


def test_cli_batch1(model, head, tmp_path):
  import json

  from helpers import cli

  lm.save(model, str(tmp_path / "m"))
  speculative.save_head(head, str(tmp_path / "h"))
  args = (
    "generate",
    "--model",
    tmp_path / "m",
    "--prompt",
    PROMPTS[0],
    "--max-new-tokens",
    24,
    "--json",
  )  # batch 1 (the other tests run batches of 4)
  code, out, err = cli(
    *args,
    "--speculative",
    "eagle",
    "--head",
    tmp_path / "h",
    "--tree-top-k",
    2,
    "--tree-depth",
    3,
    "--tree-tokens",
    6,
  )
  assert code == 0, err
  spec = json.loads(out)
  code, out, err = cli(*args)
  plain = json.loads(out)
  assert spec["tokens"] == plain["tokens"] and spec["text"] == plain["text"]
  assert spec["tree"] == {"top_k": 2, "depth": 3, "total_tokens": 6}
  assert spec["target_forwards"] >= 1 and spec["mean_accept_len"] >= 1.0
  assert spec["decode_tokens_per_s"] > 0
  for extra, msg in (
    (("--head", tmp_path / "h"), "only apply with --speculative eagle"),
    (("--speculative", "eagle"), "needs --head"),
    (
      ("--speculative", "eagle", "--head", "h", "--tree-top-k", 1, "--tree-tokens", 9),
      "--tree-tokens=9 is more than the root plus",
    ),
  ):
    code, _, err = cli(*args, *extra)
    assert code == 2 and msg in err, err
  code, _, err = cli(*args, "--speculative", "eagle", "--head", tmp_path / "nope")
  assert code == 1 and "not a head directory" in err


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_tree_forward_kernel_equals_mask_path(family, monkeypatch):
  """The verify forward through the tree-attention kernel (Pallas, interpret mode) equals the
  decoder's generic mask path over the same cache and tree (gemma2: window + softcap;
  gemma3_text: a local layer with its own RoPE base, q/k norms)."""
  from kvjax.pallas_kernels import tree_attention as kernel

  model = tiny.model(family, n_layers=2)
  dec = model.decoder
  rows = [[5, 9, 13, 2, 7, 30, 41, 8, 3, 11] * 4, [4, 4, 6]]
  cache = new_cache(model, 2, 64)
  toks = np.zeros((2, 64), np.int32)
  for b, r in enumerate(rows):
    toks[b, : len(r)] = r
  _, cache = lm_steps.prefill(
    model.graphdef,
    model.state,
    cache,
    jnp.asarray(toks),
    jnp.asarray([len(r) for r in rows], jnp.int32),
  )
  _, t = hand_tree()
  tree = jax.tree.map(lambda a: jnp.repeat(a, 2, 0), t)
  positions = cache.length[:, None] + tree.depth
  full = jnp.concatenate([jnp.ones((2, 7, cache.size), bool), tree.mask], axis=2)
  want, _ = dec(tree.tokens, cache=cache, positions=positions, mask=full)
  orig = kernel.tree_attention
  monkeypatch.setattr(
    kernel, "tree_attention", functools.partial(orig, impl="pallas", interpret=True, block=16)
  )
  got, _ = dec(tree.tokens, cache=cache, view=verify.tree_view(cache, tree.depth, tree.mask))
  np.testing.assert_allclose(got.logits, want.logits, atol=2e-4)


def test_auto_tree_picks_the_fastest_measured_size(model, head):
  logged = []
  spec, table = speculative.auto_tree(
    model,
    head,
    [PROMPTS[0]],
    top_k=2,
    depth=2,
    candidates=(5, 3, 99),
    max_new_tokens=6,
    log=logged.append,
  )
  # 99 exceeds the 1 + 2 + 4 nodes a top_k 2, depth 2 tree can hold; sizes are tried in order
  assert [r["total_tokens"] for r in table] == [3, 5] and len(logged) == 2
  fastest = max(table, key=lambda r: r["decode_tokens_per_s"])
  assert spec == TreeSpec(top_k=2, depth=2, total_tokens=fastest["total_tokens"])
  assert all(r["mean_accept_len"] >= 1.0 for r in table)
  with pytest.raises(ValueError, match="no candidate tree size in \\[99\\] fits top_k=2"):
    speculative.auto_tree(model, head, [PROMPTS[0]], top_k=2, depth=2, candidates=(99,))
