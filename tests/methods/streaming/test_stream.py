"""Endless generation and chat in constant memory (`streaming.Session`, `kvjax stream`)."""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import streaming

PROMPT = "to be or not to be, that is the question"


def stream(model_dir, *flags, stdin=None):
  """`kvjax stream --model model_dir FLAGS` -> (code, out, err)."""
  return cli("stream", "--model", model_dir, *flags, stdin=stdin)


def reply(session, prompt, **kw):
  done = {}
  text = "".join(session.turn(prompt, done=done, **kw))
  return text, done


def test_endless_generation_equals_score_of_the_repositioned_sequence(one_layer):
  """Per-token eviction through a prompt longer than a chunk and 40 tokens past the window:
  each greedy token is the argmax of `lm.score` on the sinks + the window before it (exact for
  one layer, see test_sink)."""
  n_sink, W = 2, 12
  s = streaming.Session(one_layer, n_sink=n_sink, window=W, chunk=5, stop_tokens=())
  text, done = reply(s, PROMPT, max_new_tokens=60)
  ids = one_layer.tokenizer.encode(PROMPT) + done["ids"]
  n = len(ids) - len(done["ids"])
  for i in range(n, len(ids)):  # token i was predicted after tokens [0, i)
    seen = ids[: min(n_sink, i)] + ids[max(n_sink, i - W) : i]
    assert ids[i] == int(np.argmax(lm.score(one_layer, seen)[-1])), i
  assert text == one_layer.tokenizer.decode(done["ids"])
  assert s.stats["peak_cache_tokens"] == n_sink + W and s.stats["tokens_generated"] == 60


def test_equals_dense_generation_while_nothing_is_evicted(one_layer):
  s = streaming.Session(one_layer, n_sink=4, window=100, stop_tokens=())
  text, done = reply(s, PROMPT, max_new_tokens=24)
  ref = lm.generate(one_layer, PROMPT, max_new_tokens=24, stop_tokens=())
  assert done["ids"] == ref.tokens[0] and text == ref.texts[0]


def test_each_turn_makes_room_for_its_prompt_and_reply(one_layer):
  n_sink, W = 2, 40
  s = streaming.Session(one_layer, n_sink=n_sink, window=W, stop_tokens=())
  reply(s, PROMPT, max_new_tokens=20)
  before = int(s.cache.count[0])  # every reply token is in the cache
  assert before == len(one_layer.tokenizer.encode(PROMPT)) + 20
  prompt = " and more"
  n = len(one_layer.tokenizer.encode(prompt, add_special_tokens=False))
  _, done = reply(s, prompt, max_new_tokens=16)
  assert len(done["ids"]) == 16
  # room was made once, up front: no token of the turn evicted another one of it
  assert int(s.cache.start[0]) == max(n_sink, before + n + 16 - W)
  assert int(s.cache.count[0]) == before + n + 16
  assert s.stats["peak_cache_tokens"] <= n_sink + W


def test_continue_with_an_empty_turn(one_layer):
  """An empty turn continues the previous reply: two halves equal one whole."""
  a = streaming.Session(one_layer, n_sink=2, window=16, stop_tokens=())
  _, whole = reply(a, PROMPT, max_new_tokens=30)
  b = streaming.Session(one_layer, n_sink=2, window=16, stop_tokens=())
  _, first = reply(b, PROMPT, max_new_tokens=12)
  _, second = reply(b, "", max_new_tokens=18)
  assert first["ids"] + second["ids"] == whole["ids"]


@pytest.mark.parametrize(
  "kwargs, message",
  [
    (dict(window=0), "window must be an int >= 1"),
    (dict(window=8, n_sink=-1), "n_sink must be an int >= 0"),
    (dict(window=8, chunk=9), r"chunk must be an int in \[1, window=8\]"),
    (dict(window=1020, n_sink=8), "exceeds the model's context of 1024"),
  ],
)
def test_bad_session(one_layer, kwargs, message):
  with pytest.raises(ValueError, match=message):
    streaming.Session(one_layer, **kwargs)


def test_bad_turns(one_layer):
  s = streaming.Session(one_layer, window=8)
  with pytest.raises(ValueError, match="first turn needs a non-empty prompt"):
    list(s.turn(""))
  with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1 or None"):
    list(s.turn("hi", max_new_tokens=0))
  with pytest.raises(ValueError, match="outside"):
    list(s.turn([5, 9999]))


def test_cli_chat_json(model_dir, one_layer):
  code, out, err = stream(
    model_dir,
    "--sinks",
    2,
    "--window",
    24,
    "--max-new-tokens",
    10,
    "--json",
    stdin="hello there\nand again\n",
  )
  assert code == 0, err
  got = json.loads(out)
  assert [t["prompt"] for t in got["turns"]] == ["hello there", "and again"]
  assert {"tokens_generated", "peak_cache_tokens", "tokens_per_s"} <= set(got)
  assert got["peak_cache_tokens"] <= 26 and got["tokens_per_s"] > 0
  s = streaming.Session(one_layer, n_sink=2, window=24)
  texts = ["".join(s.turn(p, max_new_tokens=10)) for p in ("hello there", "and again")]
  assert [t["text"] for t in got["turns"]] == texts
  assert got["tokens_generated"] == s.stats["tokens_generated"]


def test_cli_endless_prompt_prints_text(model_dir, one_layer):
  code, out, err = stream(
    model_dir,
    "--prompt",
    PROMPT,
    "--sinks",
    2,
    "--window",
    16,
    "--max-new-tokens",
    50,
  )
  assert code == 0, err
  s = streaming.Session(one_layer, n_sink=2, window=16)
  assert out == "".join(s.turn(PROMPT, max_new_tokens=50)) + "\n"
  assert "peak cache 18 tokens" in err


@pytest.mark.parametrize(
  "argv, words",
  [
    (["--sinks", -1], "--sinks: expected an integer >= 0"),
    (["--window", 0], "--window: expected an integer >= 1 (the cache holds the sinks plus"),
    (["--window", 8, "--chunk", 16], "--chunk 16 exceeds --window 8"),
    (["--window", 8, "--max-new-tokens", 9], "each reply must fit the window"),
    (["--top-k", 5], "--top-k only applies when sampling"),
  ],
)
def test_cli_flag_errors(model_dir, argv, words):
  code, out, err = stream(model_dir, *argv, stdin="hi\n")
  assert code == 2 and words in err and out == "", err


def test_a_reply_can_keep_no_ids(one_layer):
  """keep_ids=False (what `kvjax stream` uses, so an endless reply holds constant memory): the
  same text, only the count of its tokens."""
  kept, bare = ({}, {})
  texts = [
    "".join(
      streaming.Session(one_layer, n_sink=2, window=12, stop_tokens=()).turn(
        PROMPT, max_new_tokens=30, done=done, keep_ids=keep
      )
    )
    for done, keep in ((kept, True), (bare, False))
  ]
  assert texts[0] == texts[1] and texts[0] == one_layer.tokenizer.decode(kept["ids"])
  assert "ids" not in bare and bare["n"] == kept["n"] == 30
