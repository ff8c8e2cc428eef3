"""Skeleton-of-Thought: the shared-prefix cache against lm.score, batched expansion against
generating each point alone, independent stops, streaming order, prompts, routing, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import lm
from kvjax.cache.prefix import PrefixCache
from kvjax.lm import sot, steps, tiny
from kvjax.lm.engine import new_cache, prefill
from kvjax.lm.sot import expansion as ex
from kvjax.lm.sot.points import SkeletonError, parse_points
from kvjax.lm.sot.prompts import Prompts

SKELETON = "1. Dark room\n2) Cool air\n(3) No coffee late"
QUESTION = "How can I sleep better?"


@pytest.fixture(scope="module")
def model():
  return tiny.model("llama")


def rows_of(prefix_len=21, suffixes=(3, 9, 5), seed=0):
  rng = np.random.default_rng(seed)
  prefix = rng.integers(2, 258, prefix_len).tolist()
  return [prefix + rng.integers(2, 258, n).tolist() for n in suffixes]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_cache_equals_full_recompute(family):
  """Prefix once + each row's suffix + two decode steps: every logit equals lm.score on the
  row's whole sequence (gemma2: sliding-window layers measure distance across the split)."""
  m = tiny.model(family, windows=(8, 0)) if family == "gemma2" else tiny.model(family)
  rows = rows_of()
  n = ex.common_prefix(rows)
  assert n == 21
  _, prefix, _, _ = prefill(m, [rows[0][:n]], 0)
  cache = PrefixCache(prefix=prefix, rows=new_cache(m, 3, 32))
  suffix = np.zeros((3, 16), np.int32)
  for b, r in enumerate(rows):
    suffix[b, : len(r) - n] = r[n:]
  lens = jnp.asarray([len(r) - n for r in rows], jnp.int32)
  logits, cache = steps.extend(m.graphdef, m.state, cache, jnp.asarray(suffix), lens)
  nxt = [[7, 9, 11], [12, 13, 14]]
  got = [np.asarray(logits)]
  for toks in nxt:
    logits, cache = steps.decode_step(m.graphdef, m.state, cache, jnp.asarray(toks, jnp.int32))
    got.append(np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(cache.length), [len(r) + 2 for r in rows])
  assert cache.prefix.k.shape[1] == 1  # stored once
  for b, r in enumerate(rows):
    full = r + [nxt[0][b], nxt[1][b]]
    ref = lm.score(m, full)
    for j, g in enumerate(got):
      np.testing.assert_allclose(g[b], ref[len(r) - 1 + j], atol=2e-4)


def test_shared_expansion_equals_each_row_alone(model):
  """Greedy, rows of different lengths and budgets: each row equals lm.generate of its prompt
  alone, token for token; shared and repeated-prefix batching agree, and sharing stores the
  prefix once."""
  rows = rows_of()
  budgets = [6, 14, 9]
  shared = ex.expand(model, rows, max_new_tokens=budgets, stop_tokens=[])
  assert shared.stats["prefix_tokens_shared"] == 21
  for b, r in enumerate(rows):
    alone = lm.generate(model, [r], max_new_tokens=budgets[b], stop_tokens=[])
    assert shared.tokens[b] == alone.tokens[0]
    assert len(shared.tokens[b]) == budgets[b] and shared.finish[b] == "length"
  repeated = ex.expand(model, rows, max_new_tokens=budgets, stop_tokens=[], share=False)
  assert repeated.tokens == shared.tokens and repeated.stats["prefix_tokens_shared"] == 0
  assert shared.stats["cache_bytes"] < repeated.stats["cache_bytes"]


def test_rows_stop_independently(model):
  """A stop token one row emits ends that row only; the others run to their budgets, and
  streaming in chunks yields the same rows, in order."""
  rows = rows_of()
  free = ex.expand(model, rows, max_new_tokens=12, stop_tokens=[])
  stop = free.tokens[1][4]  # row 1 emits it at step 5
  firsts = [t.index(stop) if stop in t else None for t in free.tokens]
  got = ex.expand(model, rows, max_new_tokens=12, stop_tokens=[stop])
  for b in range(3):
    want = free.tokens[b] if firsts[b] is None else free.tokens[b][: firsts[b] + 1]
    assert got.tokens[b] == want
    assert got.finish[b] == ("length" if firsts[b] is None else "stop_token")
  assert got.finish[1] == "stop_token" and len(got.tokens[1]) <= 5
  streamed = list(ex.expand_stream(model, rows, max_new_tokens=12, stop_tokens=[stop], chunk=3))
  order = [r.index for r in streamed]
  assert order == [0, 1, 2] and [r.tokens for r in streamed] == got.tokens


def test_sampled_rows_are_the_same_for_any_chunk(model):
  """Sampling continues one PRNG stream (fold_in(key, step)) across the chunked calls: with
  one key, every chunking yields the rows of one call, and without sharing those are the
  rows of lm.generate over the same batch, each cut at its own budget."""
  rows, budgets = rows_of(), [6, 14, 9]
  s, key = lm.Sampling(temperature=0.8, top_k=40), jax.random.key(3)
  ref = lm.generate(model, rows, max_new_tokens=14, sampling=s, key=key, stop_tokens=[])
  want = [t[:n] for t, n in zip(ref.tokens, budgets)]
  greedy = lm.generate(model, rows, max_new_tokens=14, stop_tokens=[])
  assert all(a != b for a, b in zip(ref.tokens, greedy.tokens))  # it does sample

  def run(**kw):
    return [
      r.tokens
      for r in ex.expand_stream(
        model, rows, max_new_tokens=budgets, sampling=s, key=key, stop_tokens=[], **kw
      )
    ]

  assert run(share=False, chunk=4) == want
  assert (
    run(chunk=4)
    == run(chunk=None)
    == ex.expand(model, rows, max_new_tokens=budgets, sampling=s, key=key, stop_tokens=[]).tokens
  )


def test_stop_strings_end_rows_in_streaming(model):
  rows = rows_of()
  free = ex.expand(model, rows, max_new_tokens=10, stop_tokens=[])
  text = free.texts[2]
  stop = text[3:5]
  got = ex.expand(model, rows, max_new_tokens=10, stop_tokens=[], stop=[stop])
  streamed = list(
    ex.expand_stream(model, rows, max_new_tokens=10, stop_tokens=[], stop=[stop], chunk=2)
  )
  assert got.texts[2] == text[: text.find(stop)] and got.finish[2] == "stop_string"
  assert [r.text for r in streamed] == got.texts and [r.tokens for r in streamed] == got.tokens


def test_sot_expands_each_point_as_its_own_prompt(model):
  """A supplied skeleton: the points are parsed, each expansion prompt goes through the chat
  template with "{i}. {point}" prefilled, and each expansion equals generating it alone."""
  seen = []
  ans = sot.run(
    model,
    QUESTION,
    skeleton=SKELETON,
    point_tokens=[5, 8, 6],
    on_point=lambda i, t: seen.append((i, t)),
    chunk=2,
  )
  assert ans.points == ["Dark room", "Cool air", "No coffee late"]
  prompts = Prompts().expand_ids(model, QUESTION, ans.points)
  text = model.tokenizer.decode(prompts[1], skip_special_tokens=False)
  assert "1. Dark room\n2. Cool air\n3. No coffee late" in text
  assert text.endswith("<|assistant|>2. Cool air") and text.startswith("<s><|user|>")
  n_tokens = 0
  for i, p in enumerate(prompts):
    alone = lm.generate(model, [p], max_new_tokens=[5, 8, 6][i])
    assert ans.expansions[i] == alone.texts[0]
    n_tokens += len(alone.tokens[0])
  assert [i for i, _ in seen] == [1, 2, 3]
  assert [t for _, t in seen] == [
    f"{i}. {p}{e}" for i, (p, e) in enumerate(zip(ans.points, ans.expansions), 1)
  ]
  assert ans.answer.split("\n")[0].startswith("1. Dark room")
  s = ans.stats
  assert s["mode"] == "sot" and s["prefix_tokens_shared"] > 40 and s["skeleton_tokens"] == 0
  assert s["answer_tokens"] == s["generated_tokens"] == n_tokens
  assert s["latency_s"] > 0 and ans.route.router == "supplied"


def test_model_written_skeleton_and_routing(model):
  """Without a skeleton the model writes one after the prefilled "1." (the tiny model's is
  noise: it must still parse, or fail with the parser's error); "never" answers normally."""
  normal = sot.run(model, QUESTION, router="never", answer_tokens=7)
  ref = lm.generate(model, [Prompts().answer_ids(model, QUESTION)], max_new_tokens=7)
  assert normal.stats["mode"] == "normal" and normal.answer == ref.texts[0]
  assert normal.skeleton is None and not normal.route.suitable
  # the prompt router asks the model; its noise is neither yes nor no -> the rules decide
  ans = sot.run(model, "What is 3 * 7?", router="prompt", answer_tokens=4)
  assert ans.route.router == "prompt" and not ans.route.suitable
  assert "math" in ans.route.reason
  skel = lm.generate(model, [Prompts().skeleton_ids(model, QUESTION, 10)], max_new_tokens=9)
  written = "1." + skel.texts[0]
  try:
    points = parse_points(written)
  except SkeletonError as err:  # the random model's skeleton: sot.run must say the same
    with pytest.raises(SkeletonError, match=str(err)[:30]):
      sot.run(model, QUESTION, skeleton_tokens=9, point_tokens=3)
  else:
    ans = sot.run(model, QUESTION, skeleton_tokens=9, point_tokens=3)
    assert ans.skeleton == written and ans.points == points
    assert ans.stats["skeleton_tokens"] == len(skel.tokens[0])


def test_model_written_points_are_expanded(model):
  """The success branch of a model-written skeleton: with the prefill "1. Dark room\\n2. " the
  tiny model writes point 2 itself, and every point (its own included) is expanded as
  generating that point's prompt alone does; the answer joins "{i}. {point}" + expansion."""
  prompts = Prompts(skeleton_prefill="1. Dark room\n2. ")
  ans = sot.run(model, QUESTION, skeleton_tokens=9, point_tokens=[4, 6], prompts=prompts)
  skel = lm.generate(model, [prompts.skeleton_ids(model, QUESTION, 10)], max_new_tokens=9)
  assert ans.skeleton == "1. Dark room\n2. " + skel.texts[0]
  assert ans.points == ["Dark room", " ".join(skel.texts[0].split())]  # point 2: the model's
  assert ans.stats["mode"] == "sot" and ans.stats["skeleton_tokens"] == len(skel.tokens[0])
  alone = [
    lm.generate(model, [p], max_new_tokens=n).texts[0]
    for p, n in zip(prompts.expand_ids(model, QUESTION, ans.points), [4, 6])
  ]
  assert ans.expansions == alone and all(alone)
  assert ans.answer == "\n".join(
    f"{i}. {p}{e.rstrip()}" for i, (p, e) in enumerate(zip(ans.points, alone), 1)
  )


def test_plain_prompts_and_overrides(model, tmp_path):
  plain = Prompts(chat=False)
  ids = plain.expand_ids(model, QUESTION, ["a", "b"])
  text = model.tokenizer.decode(ids[0], skip_special_tokens=False)
  assert "<|user|>" not in text and text.endswith("\n\n1. a")
  f = tmp_path / "p.json"
  f.write_text(
    json.dumps(
      {"expand": "Q: {question}\n{skeleton}\nPoint {i}:", "expand_prefill": "", "chat": False}
    )
  )
  custom = Prompts.load(str(f))
  ids = custom.expand_ids(model, QUESTION, ["a", "b"])
  assert model.tokenizer.decode(ids[1]).endswith(
    "Q: How can I sleep better?\n1. a\n2. b\nPoint 2:\n\n"
  )
  bad = [
    ({"expand": "{question} {skeleton}", "expand_prefill": ""}, "name {i} or {point}"),
    ({"skeleton": "{question} {colour}"}, "Prompts.skeleton may use"),
    ({"plain": "{prefill}{user}"}, "must end with {prefill}"),
    ({"answer": "{question"}, "not a valid template"),
  ]
  for fields, match in bad:
    with pytest.raises(ValueError, match=match):
      Prompts(**fields)
  f.write_text(json.dumps({"expnd": "x"}))
  with pytest.raises(ValueError, match="keys among"):
    Prompts.load(str(f))
  no_chat = lm.Model(
    model.cfg, model.graphdef, model.state, lm.Tokenizer(model.tokenizer.tok), model.eos_ids
  )
  assert not Prompts().uses_chat(no_chat)
  with pytest.raises(ValueError, match="no chat template"):
    Prompts(chat=True).uses_chat(no_chat)


def test_errors(model):
  with pytest.raises(ValueError, match="the question is empty"):
    sot.run(model, "  ", skeleton=SKELETON)
  with pytest.raises(SkeletonError, match="no points"):
    sot.run(model, QUESTION, skeleton="just some words")
  with pytest.raises(SkeletonError, match="3 points, more than max_points=2"):
    sot.run(model, QUESTION, skeleton=SKELETON, max_points=2)
  with pytest.raises(ValueError, match="2 budgets for 3 points"):
    sot.run(model, QUESTION, skeleton=SKELETON, point_tokens=[4, 4])
  with pytest.raises(ValueError, match="one per prompt"):
    ex.expand(model, rows_of(), max_new_tokens=[4, 4])
  with pytest.raises(ValueError, match="exceeds the model's context"):
    ex.expand(model, rows_of(), max_new_tokens=2000)
  with pytest.raises(ValueError, match="chunk must be"):
    list(ex.expand_stream(model, rows_of(), chunk=0))
