"""`kvjax` success paths that no other test runs, each against a value computed without the
path under test: `ppl --cache dense|window|recompute` against `lm.score`, `stream --chunk`
against the argmax of `lm.score` on what the sink cache holds, `generate --tree-tokens auto`
against plain greedy `lm.generate` (EAGLE is lossless), and `sot` with a skeleton the model
writes against `lm.generate` of the skeleton prompt plus `sot.run` of that skeleton.

One tiny one-layer model serves every test: with one layer a token's keys and values depend on
the token alone, so a rolling-window cache predicts exactly what `lm.score` of the window does.
"""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import lm, speculative
from kvjax.lm import sot, tiny
from kvjax.lm.sot.points import parse_points
from kvjax.lm.sot.prompts import Prompts

TEXT = "to be or not to be, that is the question; " * 2
PROMPT = "to be or not to be, that is the question"  # 42 tokens with BOS
W = 12  # window of the ppl and stream runs


@pytest.fixture(scope="module")
def model():
  return tiny.model(n_layers=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, model):
  """{model, head, text}: the model saved, an EAGLE head for it, TEXT in a file."""
  root = tmp_path_factory.mktemp("paths")
  lm.save(model, str(root / "model"))
  speculative.save_head(speculative.init_head(model, "eagle1", seed=1), str(root / "head"))
  (root / "text.txt").write_text(TEXT, encoding="utf-8")
  return {k: str(root / v) for k, v in (("model", "model"), ("head", "head"), ("text", "text.txt"))}


def nll(logits: np.ndarray, targets) -> np.ndarray:
  """[N] float64 next-token losses of logits [N, V] for targets [N]."""
  x = np.asarray(logits, np.float64)
  lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return lse - x[np.arange(len(x)), list(targets)]


@pytest.mark.parametrize("cache", ["dense", "window", "recompute"])
def test_ppl_cache_modes_equal_score(model, dirs, cache):
  """dense: exp(mean nll) of one `lm.score` over the text; window (W slots, no sinks) and
  recompute (the last W tokens): token i predicted by `lm.score` of the W tokens before it."""
  argv = ["--cache", cache] + ([] if cache == "dense" else ["--window", W])
  code, out, err = cli("ppl", "--model", dirs["model"], "--text", dirs["text"], *argv, "--json")
  assert code == 0, err
  got = json.loads(out)
  ids = model.tokenizer.encode(TEXT)
  n = len(ids) - 1
  if cache == "dense":
    losses = nll(lm.score(model, ids)[:-1], ids[1:])
  else:
    rows = [ids[max(0, i - W) : i] for i in range(1, len(ids))]
    losses = nll([logits[-1] for logits in lm.score(model, rows)], ids[1:])
  assert got["ppl"] == pytest.approx(float(np.exp(losses.mean())), rel=1e-5)
  assert got["cache"] == cache and got["tokens"] == n
  assert got["peak_cache_tokens"] == (n if cache == "dense" else W)
  assert got["sinks"] == 0 and got["ms_per_token"] > 0


def test_stream_chunked_prompt_equals_score_of_the_cache(model, dirs):
  """`stream --chunk 5` (the 42-token prompt in chunks of 5, 2 left over, evicting as it goes
  through 2 sinks + a 12-token window): each greedy token is the argmax of `lm.score` on the
  sinks and the window before it."""
  code, out, err = cli(
    "stream",
    "--model",
    dirs["model"],
    "--prompt",
    PROMPT,
    "--sinks",
    2,
    "--window",
    W,
    "--chunk",
    5,
    "--max-new-tokens",
    24,
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  ids = model.tokenizer.encode(PROMPT)
  n = len(ids)
  assert n % 5 and n > 2 + W
  for _ in range(24):
    seen = ids[:2] + ids[max(2, len(ids) - W) :]
    ids.append(int(np.argmax(lm.score(model, seen)[-1])))
    if ids[-1] in model.eos_ids:
      break
  new = [t for t in ids[n:] if t not in model.eos_ids]
  (turn,) = got["turns"]
  assert turn["text"] == model.tokenizer.decode(new)
  assert turn["finish"] == ("stop_token" if ids[-1] in model.eos_ids else "length")
  assert got["tokens_generated"] == len(ids) - n and got["prompt_tokens"] == n
  assert got["peak_cache_tokens"] == 2 + W


def test_generate_tree_tokens_auto_is_lossless(model, dirs):
  """`--tree-tokens auto` times the tree sizes that fit top_k 2, depth 3 (only 8: at most
  1 + 2 + 2 * 4 = 11 tokens), takes one, and its greedy tokens are plain `lm.generate`'s."""
  code, out, err = cli(
    "generate",
    "--model",
    dirs["model"],
    "--prompt",
    PROMPT,
    "--max-new-tokens",
    12,
    "--speculative",
    "eagle",
    "--head",
    dirs["head"],
    "--tree-top-k",
    2,
    "--tree-depth",
    3,
    "--tree-tokens",
    "auto",
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  ref = lm.generate(model, PROMPT, max_new_tokens=12)
  assert got["tokens"] == ref.tokens and got["text"] == ref.texts
  assert got["tree"] == {"top_k": 2, "depth": 3, "total_tokens": 8}
  assert "tree tokens   8:" in err and "auto: --tree-tokens 8" in err
  assert got["target_forwards"] >= 1


def test_sot_model_written_skeleton(model, dirs, tmp_path):
  """Without --skeleton the model writes one after the prefill (here "1. ", so that a random
  model's text is a point): the skeleton is `lm.generate` of the skeleton prompt, and the
  points and their expansions are `sot.run`'s on that skeleton supplied."""
  prompts_file = tmp_path / "prompts.json"
  prompts_file.write_text(json.dumps({"skeleton_prefill": "1. "}), encoding="utf-8")
  question = "How can I sleep better?"
  code, out, err = cli(
    "sot",
    "--model",
    dirs["model"],
    "--question",
    question,
    "--prompts",
    prompts_file,
    "--skeleton-tokens",
    10,
    "--point-tokens",
    6,
    "--no-baseline",
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  prompts = Prompts(skeleton_prefill="1. ")
  written = lm.generate(model, [prompts.skeleton_ids(model, question, 10)], max_new_tokens=10)
  skeleton = "1. " + written.texts[0]
  assert got["skeleton"] == skeleton
  assert got["route"]["router"] == "rules" and got["stats"]["mode"] == "sot"
  assert got["stats"]["skeleton_tokens"] == len(written.tokens[0])
  ref = sot.run(model, question, skeleton=skeleton, point_tokens=6, prompts=prompts)
  assert got["points"] == ref.points == parse_points(skeleton) and got["points"]
  assert got["expansions"] == ref.expansions and got["answer"] == ref.answer
