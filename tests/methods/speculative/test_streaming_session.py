"""EAGLE inside a StreamingLLM session (`speculative.StreamingSession`, `kvjax stream
--speculative eagle`): greedy output and cache equal the plain session's across wrap-arounds
of the ring, turns that end mid-round, and the head's own eviction."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli

from kvjax import lm, speculative
from kvjax.cache.dense import KVCache
from kvjax.lm import rope, streaming, tiny
from kvjax.speculative import session as spec_session

TREE = speculative.TreeSpec(top_k=4, depth=4, total_tokens=12)


@pytest.fixture(scope="module")
def model():
  return lm.load("shakespeare")


@pytest.fixture(scope="module")
def head(model):
  """The bundled head: it accepts several tokens per round, so rounds commit paths of every
  length and turns end inside them."""
  return speculative.load_head("shakespeare", model)


def replies(session, turns, **kw):
  out = []
  for prompt, n in turns:
    done = {}
    text = "".join(session.turn(prompt, max_new_tokens=n, done=done, **kw))
    out.append((text, done["ids"], done["finish"]))
  return out


def held(cache):
  """The tokens' keys and values a SinkCache holds, by slot, and its counters."""
  n = int(cache.length[0])
  idx = np.r_[0 : min(cache.n_sink, n), cache.n_sink : cache.n_sink + n - min(cache.n_sink, n)]
  return (
    np.asarray(cache.k)[:, 0, :, idx],
    np.asarray(cache.v)[:, 0, :, idx],
    int(cache.count[0]),
    int(cache.start[0]),
  )


def test_greedy_equals_plain_streaming_across_wraparounds(model, head):
  """A 4 + 28 slot cache, three turns (one continued with an empty prompt), 250 tokens: the
  ring wraps around nine times. The same replies, and the same tokens in the cache with the
  same keys and values (rejected drafts leave no trace); the head's cache keeps at most
  n_sink + window pairs."""
  turns = [("ROMEO:", 150), ("JULIET:", 40), ("", 60)]
  kw = dict(n_sink=4, window=28, chunk=8, stop_tokens=())
  plain = streaming.Session(model, **kw)
  spec = speculative.StreamingSession(model, head, tree=TREE, **kw)
  want, got = replies(plain, turns), replies(spec, turns)
  assert got == want
  s = spec.stats
  assert s["tokens_generated"] == 250 and s["peak_cache_tokens"] == 32
  assert s["rounds"] < 100 and s["mean_accept_len"] == sum(s["accept_lens"]) / s["rounds"]
  assert s["mean_accept_len"] > 2  # paths of several tokens were committed
  for a, b in zip(held(spec.cache), held(plain.cache)):
    np.testing.assert_allclose(a, b, atol=1e-4)
  assert int(spec.hcache.length[0]) == 32


def test_turns_ending_inside_a_round(model, head):
  """Stop tokens and stop strings end turns after any token of a round: the tokens taken stay
  in the cache, the rest of the round's path is dropped, and the next turn goes on from there
  exactly as the plain session does."""
  tok = model.tokenizer
  stop_id = tok.encode("\n", add_special_tokens=False)[-1]
  turns = [("ROMEO:", 40), ("JULIET:", 40), ("", 30), ("KING:", 50)]
  kw = dict(n_sink=2, window=40, chunk=16, stop_tokens=(stop_id,))
  want = replies(streaming.Session(model, **kw), turns, stop=("the",))
  spec = speculative.StreamingSession(model, head, tree=TREE, **kw)
  got = replies(spec, turns, stop=("the",))
  assert got == want
  assert {f for _, _, f in got} >= {"stop_token", "stop_string"}


def test_abandoned_turn_is_settled_by_the_next(model, head):
  """A consumer that stops reading mid-round (and never closes the turn) loses nothing: the
  next turn first writes the tokens it took."""
  kw = dict(n_sink=4, window=28, chunk=8, stop_tokens=())
  plain = streaming.Session(model, **kw)
  spec = speculative.StreamingSession(model, head, tree=TREE, **kw)
  pieces = spec.turn("ROMEO:", max_new_tokens=50)
  taken = [next(pieces) for _ in range(7)]
  plain_pieces = plain.turn("ROMEO:", max_new_tokens=50)
  assert taken == [next(plain_pieces) for _ in range(7)]
  # the plain session's cache holds every token it yielded: both go on alike
  assert replies(spec, [("", 30)]) == replies(plain, [("", 30)])


def test_sampled_session_runs_and_counts(model, head):
  kw = dict(n_sink=4, window=28, sampling=lm.Sampling(temperature=0.8), stop_tokens=())
  spec = speculative.StreamingSession(model, head, tree=TREE, key=jax.random.key(3), **kw)
  ((text, ids, finish),) = replies(spec, [("ROMEO:", 80)])
  assert len(ids) == 80 and finish == "length" and text == model.tokenizer.decode(ids)
  prompt = len(model.tokenizer.encode("ROMEO:"))
  assert spec.stats["rounds"] < 80 and int(spec.cache.count[0]) == prompt + 80


def test_head_eviction_equals_a_cache_written_at_the_new_positions():
  """`evict` keeps the sink pairs, slides the newest ones down and re-rotates their keys: the
  same as writing those keys at their new positions."""
  B, K, H, S, n_sink, keep = 2, 2, 8, 12, 2, 6
  freq = jnp.asarray(rope.inv_freq(tiny.config("llama"), layer=0))[: H // 2]
  raw = jax.random.normal(jax.random.key(0), (1, B, K, S, H))
  length = jnp.asarray([9, 4], jnp.int32)  # row 0 evicts 3, row 1 nothing
  pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  cos, sin = rope.tables(pos, freq)
  k = rope.rotate(raw[0], cos, sin, heads_first=True)[None]
  c = spec_session.evict(KVCache(k=k, v=raw * 2, pos=pos, length=length), n_sink, keep, freq)
  assert c.length.tolist() == [6, 4]
  e = 3
  src = np.r_[0:n_sink, n_sink + e : 9]  # row 0's surviving slots
  new_pos = jnp.arange(6)[None]
  cos, sin = rope.tables(new_pos, freq)
  want = rope.rotate(raw[0][:1][:, :, src], cos, sin, heads_first=True)
  np.testing.assert_allclose(c.k[0, :1, :, :6], want, atol=1e-5)
  np.testing.assert_array_equal(c.v[0, 0, :, :6], raw[0, 0][:, src] * 2)
  np.testing.assert_array_equal(c.pos[0, :6], np.arange(6))
  np.testing.assert_array_equal(c.k[0, 1, :, :4], k[0, 1, :, :4])  # rotated by 0: exact


def test_bad_heads_and_trees(model, head):
  other = tiny.model("llama", n_layers=1)
  with pytest.raises(speculative.HeadError, match="trained for another target"):
    speculative.StreamingSession(other, head, window=16)
  with pytest.raises(TypeError, match="TreeSpec"):
    speculative.StreamingSession(model, head, window=16, tree=(4, 4, 12))
  with pytest.raises(ValueError, match="keep_accept_lens must be an int >= 1; got 0"):
    speculative.StreamingSession(model, head, window=16, keep_accept_lens=0)
  with pytest.raises(ValueError, match="window must be an int >= 1"):
    speculative.StreamingSession(model, head, window=0)


def test_cli_equals_plain_stream(model):
  argv = ["stream", "--model", "shakespeare", "--prompt", "ROMEO:", "--window", "28"]
  argv += ["--max-new-tokens", "60", "--json"]
  code, out, err = cli(*argv)
  assert code == 0, err
  tree = ["--tree-top-k", "4", "--tree-depth", "4", "--tree-tokens", "12"]
  code, spec_out, err = cli(*argv, "--speculative", "eagle", "--head", "shakespeare", *tree)
  assert code == 0, err
  plain, spec = json.loads(out), json.loads(spec_out)
  assert spec["turns"] == plain["turns"] and spec["tokens_generated"] == 60
  assert spec["tree"] == {"top_k": 4, "depth": 4, "total_tokens": 12}
  assert spec["rounds"] < 60 and spec["mean_accept_len"] > 1


@pytest.mark.parametrize(
  "argv, words",
  [
    (["--head", "shakespeare"], "--head only apply with --speculative eagle"),
    (["--speculative", "eagle"], "--speculative eagle needs --head"),
    (
      ["--speculative", "eagle", "--head", "x", "--tree-tokens", "auto"],
      "--tree-tokens: expected an integer >= 2",
    ),
    (["--speculative", "eagle", "--head", "x", "--tree-top-k", "0"], "--tree-top-k"),
  ],
)
def test_cli_flag_errors(argv, words):
  code, out, err = cli("stream", "--model", "shakespeare", *argv, stdin="hi\n")
  assert code == 2 and words in err and out == "", err
