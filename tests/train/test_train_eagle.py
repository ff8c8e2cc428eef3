"""EAGLE head training (kvjax.train.eagle): losses, training-time test, resume, export, CLI.

The target is a tiny random 2-layer llama whose LM head is scaled up so its next-token
distributions are peaked (a random model's are near uniform, leaving the head nothing to
learn). The CLI run and the library runs share settings, so they share compiled steps.
"""

import contextlib
import io
import itertools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvjax import lm, speculative
from kvjax.lm import tiny
from kvjax.speculative import head as hd
from kvjax.train import cli as train_cli
from kvjax.train import eagle, eagle_data, loop, metrics
from kvjax.train.text import TextData

B, T, STEPS = 4, 32, 30
TREE = speculative.TreeSpec(top_k=2, depth=2, total_tokens=3)


def run_cli(*argv):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = train_cli.main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def train_eagle(setup, out, *flags):
  """`train eagle --target TARGET --text CORPUS --out out *flags` (setup's target and
  corpus) -> (exit code, stdout, stderr)."""
  _, target_dir, corpus, _ = setup
  return run_cli("eagle", "--target", target_dir, "--text", corpus, "--out", out, *flags)


def assert_lossless(target, head):
  """Greedy speculative generation with `head` gives the target's own greedy tokens."""
  prompt = target.tokenizer.encode("to be or not")
  want = lm.generate(target, [prompt], max_new_tokens=16, stop_tokens=[])
  got = speculative.generate(target, head, [prompt], max_new_tokens=16, stop_tokens=[], tree=TREE)
  assert got.tokens == want.tokens


@pytest.fixture(scope="module")
def setup(tmp_path_factory, random_words):
  """(root, target dir, corpus path, target Model loaded from the dir)."""
  root = tmp_path_factory.mktemp("eagle")
  model = tiny.model("llama", n_layers=2)
  params = model.params()
  params["head"] = params["head"] * 40.0  # peaked next-token distributions
  lm.save(model.with_params(params), str(root / "target"))
  text = random_words(np.random.default_rng(0), 1500)
  (root / "corpus.txt").write_text(text, encoding="utf-8")
  return root, root / "target", root / "corpus.txt", lm.load(str(root / "target"))


def text_data(setup):
  _, _, corpus, target = setup
  return TextData(str(corpus), target.tokenizer, seq_len=T, batch_size=B, seed=0, eval_fraction=0.1)


# The settings of `config()` and of the CLI runs (CLI_FLAGS).
RUN = dict(kind="eagle1", steps=STEPS, batch_size=B, seq_len=T, lr=3e-3, warmup=3, log_every=1)


def config(out_dir, kind="eagle1", **kw):
  """RUN as an EagleConfig of `kind` writing to out_dir, 3 ttt steps; kw override."""
  return eagle.EagleConfig(**{**RUN, "kind": kind, "out_dir": str(out_dir), "ttt_steps": 3, **kw})


CLI_FLAGS = (
  *(x for k, v in RUN.items() for x in ("--" + k.replace("_", "-"), v)),
  "--eval-batches",
  2,
  "--eval-prompts",
  0,
  "--no-progress",
  "--json",
)


@pytest.fixture(scope="module")
def cli_run(setup):
  """An uninterrupted 30-step eagle1 run through the CLI -> (out dir, summary)."""
  out = setup[0] / "e1"
  code, stdout, err = train_eagle(setup, out, *CLI_FLAGS)
  assert code == 0, err
  return out, json.loads(stdout)


@pytest.fixture(scope="module")
def e3_run(setup):
  """A 30-step eagle3 run (K = 3) through the library; the target's params before it."""
  root, _, _, target = setup
  before = jax.tree.map(np.array, target.params())
  head = speculative.init_head(target, "eagle3")
  result = eagle.train(
    target, head, config(root / "e3", "eagle3"), text_data(setup).train_batches, progress=False
  )
  return result, before, head


def losses(records):
  return [r["loss"] for r in records]


def test_eagle1_cli_run_lowers_the_loss(cli_run):
  out, summary = cli_run
  records = metrics.read(str(out))
  assert [r["step"] for r in records] == list(range(1, STEPS + 1))
  assert {"loss", "feature_loss", "ce", "top1", "lr", "grad_norm"} <= set(records[0])
  loss = losses(records)
  assert np.mean(loss[-5:]) < 0.8 * loss[0], loss
  assert np.mean([r["top1"] for r in records[-5:]]) > records[0]["top1"] + 0.1
  assert records[-1]["eval_loss"] is not None and summary["eval_loss"] == records[-1]["eval_loss"]
  assert summary["resumed_from"] == 0 and summary["kind"] == "eagle1"
  assert os.path.isfile(out / "head" / "head.json") and os.path.isfile(out / metrics.PNG)


def test_eagle3_lowers_the_loss_and_leaves_the_target_alone(e3_run, setup):
  result, before, head = e3_run
  target = setup[3]
  loss = losses(result.records)
  assert np.mean(loss[-5:]) < loss[0] - 0.3, loss
  assert result.records[-1]["top1_last"] > result.records[0]["top1_last"] + 0.1
  after = target.params()
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(a, np.asarray(b), err_msg=str(path))
  # only head params were trained; the fuse layer (a head param) moved
  assert jax.tree.structure(result.head.params()) == jax.tree.structure(head.params())
  assert not np.array_equal(result.head.params()["fuse"], head.params()["fuse"])


def test_eagle1_loss_matches_a_hand_computation(setup, cli_run):
  """SmoothL1(h_i, f_{i+1}) mean over D + 0.1 soft CE(softmax(L_{i+1}), head logits_i), over
  positions i where t_i, t_{i+1}, t_{i+2} are real (mask[i] and mask[i + 1])."""
  _, _, _, target = setup
  head = speculative.init_head(target, "eagle1", seed=3)
  batch = text_data(setup).batch(0)
  batch["mask"][0, 10] = 0.0  # drops positions 9 and 10 of row 0
  batch["mask"][1, 20:] = 0.0
  ec = config("unused")
  got = eagle.cached_steps(target, head, ec)[2](
    head.params(), target.params(), loop.to_device(batch, keys=loop.TOKEN_KEYS)
  )
  dec = target.decoder
  out, _ = dec(jnp.asarray(batch["inputs"]))
  f, L = np.asarray(out.hidden), np.asarray(out.logits)
  module = head.module
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  h, _ = module(
    jnp.asarray(f), dec.embed_tokens(jnp.asarray(batch["targets"])), cache=None, positions=pos
  )
  q = np.asarray(module.logits(h, dec), np.float64)[:, :-1]
  h = np.asarray(h, np.float64)
  m = batch["mask"]
  valid = m[:, :-1] * m[:, 1:]
  d = h[:, :-1] - f[:, 1:]
  smooth = np.where(np.abs(d) < 1, 0.5 * d * d, np.abs(d) - 0.5).mean(-1)
  p = np.exp(L[:, 1:] - L[:, 1:].max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  logq = q - q.max(-1, keepdims=True)
  logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
  ce = -(p * logq).sum(-1)
  feature_loss = (smooth * valid).sum() / valid.sum()
  token_loss = (ce * valid).sum() / valid.sum()
  assert float(got["n"]) == valid.sum() == B * (T - 1) - 2 - 12
  np.testing.assert_allclose(float(got["feature_loss"]), feature_loss, rtol=1e-5)
  np.testing.assert_allclose(float(got["ce"]), token_loss, rtol=1e-5)
  np.testing.assert_allclose(float(got["loss"]), feature_loss + 0.1 * token_loss, rtol=1e-5)


def test_ttt_masks_k3_t5():
  # columns: step-0 slots 0-4 | step-1 slots 5-9 | the step's own 5 pairs
  expected = np.array(
    [
      # step 0: causal among its own pairs
      [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1],
      ],
      # step 1 at i: step-0 pairs <= i - 1, itself
      [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
      ],
      # step 2 at i: step-0 pairs <= i - 2, the step-1 pair at i - 1, itself
      [
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
      ],
    ],
    bool,
  )
  np.testing.assert_array_equal(np.asarray(eagle.ttt_masks(3, 5)), expected)
  # two documents in a row: step-0 keys stay inside the query's document
  seg = jnp.asarray([[1, 1, 1, 2, 2]])
  got = np.asarray(eagle.ttt_masks(3, 5, seg))[:, 0]
  np.testing.assert_array_equal(got[1, 4, :5], [0, 0, 0, 1, 0])
  np.testing.assert_array_equal(got[0, 3, 10:], [0, 0, 0, 1, 0])
  # a position counts at step j when t_{i-j} .. t_{i+2} are real: mask[i - j .. i + 1]
  mask = jnp.asarray([[1, 1, 1, 0, 1, 1, 1, 1.0]])
  np.testing.assert_array_equal(
    np.asarray(eagle.valid_masks(mask, 3))[:, 0],
    [[1, 1, 0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 0]],
  )


def test_ttt_steps_are_what_drafting_computes(setup):
  """Step j's output at position i equals a chain draft j levels deep under the context of
  pairs 0 .. i - j, run pair by pair through the head cache as speculative decoding does."""
  from flax import nnx

  _, _, _, target = setup
  head = speculative.init_head(target, "eagle3", seed=1)
  rng = np.random.default_rng(4)
  f = jnp.asarray(rng.normal(size=(1, 8, 64)), jnp.float32)
  e = jnp.asarray(rng.normal(size=(1, 8, 64)), jnp.float32)
  pos = jnp.arange(8)[None]
  n = 4  # context pairs 0 .. 3

  @jax.jit
  def both(state, f, e):
    module = nnx.merge(head.graphdef, state)
    hs = eagle.ttt_forward(module, f, e, pos, 3)
    cache = hd.new_cache(module.hc, 1, 16, jnp.float32)
    x, cache = module(f[:, :n], e[:, :n], cache=cache, positions=pos[:, :n])
    chain = [x]
    x = x[:, -1:]
    for level in (1, 2):
      x, cache = module(
        x, e[:, n - 1 + level : n + level], cache=cache, positions=pos[:, n - 1 + level : n + level]
      )
      chain.append(x[:, 0])
    return hs, chain

  hs, chain = both(head.state, f, e)
  np.testing.assert_allclose(chain[0], hs[0][:, :n], atol=1e-5)
  for level in (1, 2):
    np.testing.assert_allclose(chain[level], hs[level][:, n - 1 + level], atol=1e-5)


class Interrupt(Exception):
  """Raised by the crashing batch iterator to stop a run mid-way."""


def test_resume_is_bit_identical(setup, cli_run, tmp_path):
  _, _, _, target = setup
  _, summary = cli_run
  data = text_data(setup)

  def crashing(start):
    for i, batch in enumerate(data.train_batches(start), start):
      if i == 17:
        raise Interrupt
      yield batch

  ec = config(tmp_path, save_every=7, keep=2)
  head = speculative.init_head(target, "eagle1")
  with pytest.raises(Interrupt):
    eagle.train(target, head, ec, crashing, progress=False)
  assert sorted(os.listdir(tmp_path / "checkpoints"), key=int) == ["7", "14"]
  resumed = eagle.train(target, head, ec, data.train_batches, progress=False)
  assert resumed.resumed_from == 14
  assert [r["step"] for r in metrics.read(str(tmp_path))] == list(range(1, STEPS + 1))
  full = speculative.load_head(summary["export"], target).params()
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(full), jax.tree.leaves(resumed.head.params())
  ):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  with pytest.raises(eagle.TrainError, match=r"different run.*lr"):
    eagle.train(target, head, config(tmp_path, lr=1e-2), data.train_batches, progress=False)


def test_export_loads_and_drafts(setup, cli_run):
  _, _, _, target = setup
  _, summary = cli_run
  head = speculative.load_head(summary["export"], target)
  assert head.hc.kind == "eagle1"
  prompt = target.tokenizer.encode("to be or not that is")
  got = speculative.generate(target, head, [prompt], max_new_tokens=16, tree=TREE)
  assert got.stats["mean_accept_len"] >= 1.0 and len(got.tokens[0]) == 16
  val = eagle.validate(
    target,
    head,
    [prompt],
    config("unused", tree_top_k=2, tree_depth=2, tree_tokens=3, new_tokens=16),
  )
  assert val == got.stats["mean_accept_len"]


def test_self_distill_sequences(setup, tmp_path, monkeypatch):
  _, _, _, target = setup
  data = text_data(setup)
  (train_tokens, doc), _ = eagle_data.text_streams(data)
  prompts = eagle_data.prompts_from_stream(train_tokens, doc, 3, 8, rng=np.random.default_rng(0))
  path = str(tmp_path / eagle_data.DISTILL_FILE)
  seqs = eagle_data.self_distill(target, prompts, 20, seed=0, path=path, chunk=4, progress=False)
  assert seqs.shape == (3, 20) and seqs.dtype == np.int32
  np.testing.assert_array_equal(seqs[:, :8], prompts)
  assert (seqs[:, 8:] != -1).any()
  monkeypatch.setattr(sys.modules["kvjax.lm.generate"], "generate", None)  # read back, not made
  np.testing.assert_array_equal(eagle_data.self_distill(target, prompts, 20, path=path), seqs)
  with pytest.raises(eagle.TrainError, match="another run"):
    eagle_data.self_distill(target, prompts, 24, path=path)
  batch = eagle_data.SequenceData(seqs, batch_size=2, seed=0).batch(0)
  assert batch["inputs"].shape == (2, 19)
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])


def test_self_distill_resumes_where_it_was_interrupted(setup, tmp_path, monkeypatch):
  """A run stopped after two of three chunks keeps them in the partial file; the rerun makes
  only the last chunk and gives the sequences of an uninterrupted run."""
  _, _, _, target = setup
  (train_tokens, doc), _ = eagle_data.text_streams(text_data(setup))
  prompts = eagle_data.prompts_from_stream(train_tokens, doc, 5, 6, rng=np.random.default_rng(1))
  kw = dict(seed=3, temperature=1.0, chunk=2, progress=False)
  want = eagle_data.self_distill(target, prompts, 14, path=str(tmp_path / "a.npy"), **kw)
  real, calls = eagle_data.generate, []

  def stops_at_the_third_chunk(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(eagle_data, "generate", stops_at_the_third_chunk)
  path = str(tmp_path / "b.npy")
  with pytest.raises(KeyboardInterrupt):
    eagle_data.self_distill(target, prompts, 14, path=path, **kw)
  assert not os.path.exists(path) and os.path.exists(path + ".partial.npz")
  calls.clear()
  calls.append(1)  # the rerun's one call (the last chunk) is the second: no interruption
  np.testing.assert_array_equal(eagle_data.self_distill(target, prompts, 14, path=path, **kw), want)
  assert len(calls) == 2 and not os.path.exists(path + ".partial.npz")
  with pytest.raises(KeyboardInterrupt):  # interrupted again, then resumed with other settings
    calls.clear()
    os.remove(path)
    eagle_data.self_distill(target, prompts, 14, path=path, **kw)
  with pytest.raises(eagle.TrainError, match="other prompts or settings"):
    eagle_data.self_distill(target, prompts, 14, path=path, **{**kw, "seed": 4})


def test_self_distill_on_instruction_prompts(setup, tmp_path):
  """--distill-prompts instructions: the sequences start with kvjax's instruction prompts as
  chat turns (the same for the same seed), and the target's own continuations follow."""
  _, _, _, target = setup
  flags = ("--steps", 2, "--warmup", 1, "--batch-size", 2, "--seq-len", 120, "--eval-prompts", 0)
  code, _, err = train_eagle(
    setup,
    tmp_path,
    *flags,
    "--self-distill",
    3,
    "--distill-prompts",
    "instructions",
    "--no-progress",
  )
  assert code == 0, err
  seqs = np.load(tmp_path / eagle_data.DISTILL_FILE)
  starts = eagle_data.chat_prompts(target, 3, seed=0)
  assert seqs.shape == (3, 121)
  for row, p in zip(seqs, starts):
    np.testing.assert_array_equal(row[: len(p)], p)
    assert "<|assistant|>" in target.tokenizer.decode(p) and (row[len(p) :] != -1).any()
  code, _, err = train_eagle(setup, tmp_path / "x", *flags, "--distill-prompts", "web")
  assert code == 2 and "--distill-prompts: expected corpus or instructions; got web" in err


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--kind", "eagle2"], "argument --kind: invalid choice: 'eagle2'"),
    (["--ttt-steps", 0], "--ttt-steps: expected an integer >= 1; got 0"),
    (["--target", "no-such-model"], "--target: 'no-such-model' is not a model directory"),
    (["--steps", 5, "--warmup", 5], "--warmup (5) must be smaller than --steps (5)"),
    (
      ["--tree-top-k", 1, "--tree-tokens", 32],
      "--tree-top-k/--tree-depth/--tree-tokens: tree total_tokens=32",
    ),
    (["--data", "x"], "exactly one of --text FILE and --data"),
  ],
)
def test_bad_flags_exit_2(setup, tmp_path, argv, message):
  code, _, err = train_eagle(setup, tmp_path, *argv)
  assert code == 2 and message in err, err
  assert "Traceback" not in err


def test_missing_target_and_bad_config(tmp_path, setup):
  _, _, corpus, _ = setup
  code, _, err = run_cli("eagle", "--text", corpus, "--out", tmp_path)
  assert code == 2 and "--target DIR_OR_NAME is required" in err
  conf = tmp_path / "c.json"
  conf.write_text(json.dumps({"kind": "medusa"}))
  code, _, err = run_cli("eagle", "--config", conf)
  assert code == 2 and "--kind must be one of eagle1, eagle3; got 'medusa'" in err


def test_eagle3_reduced_draft_vocabulary(setup, tmp_path):
  """An eagle3 head with a reduced draft vocabulary (EAGLE-3's d2t): the N most frequent
  target tokens of the first batches (kvjax train eagle --draft-vocab N), its own LM head
  started from the target's columns, drafts only those tokens, trains (loss over the draft
  vocabulary at positions whose target argmax is in it), saves and loads with its map, and
  speculative generation stays lossless."""
  target = setup[3]
  out = tmp_path / "e3v"
  flags = list(CLI_FLAGS)
  flags[flags.index("eagle1")] = "eagle3"
  code, _, err = train_eagle(setup, out, "--draft-vocab", 24, "--ttt-steps", 3, *flags)
  assert code == 0, err
  head = speculative.load_head(str(out / "head"), target)
  d2t = head.hc.draft_vocab
  assert len(d2t) == 24 and len(set(d2t)) == 24
  data = text_data(setup)
  first = np.concatenate(
    [b["targets"][b["mask"] > 0] for b in itertools.islice(data.train_batches(0), 64)]
  )
  counts = np.bincount(first, minlength=target.cfg.vocab_size)
  assert list(d2t) == sorted(range(target.cfg.vocab_size), key=lambda i: (-counts[i], i))[:24]
  records = metrics.read(str(out))
  assert np.isfinite([r["loss"] for r in records]).all()
  assert np.mean(losses(records)[-5:]) < losses(records)[0]
  h = jnp.ones((2, target.cfg.d_model), jnp.float32)
  logits = np.asarray(nnx.merge(head.graphdef, head.state).logits(h, target.decoder))
  outside = np.setdiff1d(np.arange(target.cfg.vocab_size), d2t)
  assert (logits[:, outside] < -1e30).all() and set(np.argmax(logits, -1)) <= set(d2t)
  assert_lossless(target, head)
  code, _, err = train_eagle(setup, tmp_path / "x", "--draft-vocab", 8, *CLI_FLAGS)
  assert code == 2 and "--draft-vocab applies to --kind eagle3" in err
  with pytest.raises(speculative.HeadError, match="distinct token ids"):
    speculative.init_head(target, "eagle3", draft_vocab=(3, 3))
  with pytest.raises(speculative.HeadError, match="eagle3 heads only"):
    speculative.init_head(target, "eagle1", draft_vocab=(3, 4))


def test_published_eagle1_trains_and_exports(setup, tmp_path):
  """kvjax train eagle --published --export-format eagle1: the reference architecture,
  written in the published layout, loads back (load_head detects it) and stays lossless."""
  target = setup[3]
  out = tmp_path / "pub"
  code, _, err = train_eagle(setup, out, "--published", "--export-format", "eagle1", *CLI_FLAGS)
  assert code == 0, err
  assert sorted(os.listdir(out / "head")) == ["config.json", "model.safetensors"]
  head = speculative.load_head(str(out / "head"), target)
  assert head.hc.published and head.hc.kind == "eagle1"
  assert_lossless(target, head)
  for extra, msg in (
    (("--export-format", "eagle1"), "needs --published"),
    (("--published", "--export-format", "eagle3"), "--kind is eagle1"),
  ):
    code, _, err = train_eagle(setup, tmp_path / "x", *extra, *CLI_FLAGS)
    assert code == 2 and msg in err, err


def _sequences(setup, n=10):
  """n rows of T + 1 tokens of the corpus, the last two rows ending early (-1)."""
  data = text_data(setup)
  seqs = data.windows[:n].astype(np.int32).copy()
  seqs[-1, T - 5 :] = -1
  seqs[-2, 7:] = -1
  return seqs


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
def test_cached_features_give_the_live_loss(setup, tmp_path, kind):
  """kvjax.train.eagle_features: a batch of stored target features and top-k labels (k = the
  whole vocabulary) scores as the live target forward does, up to bfloat16 rounding (eagle3
  with a reduced draft vocabulary); with k = 3 the label keeps 3 tokens and the loss moves."""
  from kvjax.train import eagle_features

  target = setup[3]
  seqs = _sequences(setup)
  vocab = (4, 9, 2, 11, 5, 30, 7, 1, 8, 3) if kind == "eagle3" else ()
  head = speculative.init_head(target, kind, seed=1, draft_vocab=vocab)
  V = target.cfg.vocab_size
  store = eagle_features.compute(target, head, seqs, str(tmp_path / "f"), batch_size=B, top_k=V)
  feats = eagle_features.FeatureData(eagle_data.SequenceData(seqs, batch_size=B, seed=0), store)
  batch = feats.batch(2)  # rows across an epoch boundary
  ec = config("unused", kind)
  evaluate = eagle.cached_steps(target, head, ec)[2]
  live = evaluate(head.params(), target.params(), loop.to_device(batch, keys=loop.TOKEN_KEYS))
  cached_batch = {
    **loop.to_device(batch, keys=loop.TOKEN_KEYS),
    **jax.device_put({k: batch[k] for k in eagle.CACHED_KEYS}),
  }
  cached = evaluate(head.params(), target.params(), cached_batch)
  assert float(live["n"]) == float(cached["n"]) > 0
  for k in live:
    np.testing.assert_allclose(float(cached[k]), float(live[k]), rtol=0.02, atol=1e-3)
  store3 = eagle_features.compute(target, head, seqs, str(tmp_path / "k3"), batch_size=B, top_k=3)
  b3 = eagle_features.FeatureData(feats.data, store3).batch(2)
  assert b3["label_ids"].shape == (B, T, 3)
  np.testing.assert_array_equal(b3["label_ids"], batch["label_ids"][..., :3])
  cached3 = evaluate(
    head.params(),
    target.params(),
    {
      **loop.to_device(b3, keys=loop.TOKEN_KEYS),
      **jax.device_put({k: b3[k] for k in eagle.CACHED_KEYS}),
    },
  )
  assert np.isfinite(float(cached3["loss"])) and float(cached3["ce"]) != float(cached["ce"])


def test_feature_store_resumes_and_refuses_other_runs(setup, tmp_path, monkeypatch):
  """A store interrupted after its first batch resumes to the arrays of an uninterrupted
  one; a store of other sequences, another head kind or k is refused by name."""
  from kvjax.train import eagle_features

  target = setup[3]
  seqs = _sequences(setup)
  head = speculative.init_head(target, "eagle3", seed=1)
  whole = eagle_features.compute(target, head, seqs, str(tmp_path / "a"), batch_size=4)
  real = eagle_features._forward
  calls = []

  def failing(*args):
    step = real(*args)

    def once(params, inputs):
      if calls:
        raise KeyboardInterrupt
      calls.append(1)
      return step(params, inputs)

    return once

  monkeypatch.setattr(eagle_features, "_forward", failing)
  with pytest.raises(KeyboardInterrupt):
    eagle_features.compute(target, head, seqs, str(tmp_path / "b"), batch_size=4)
  assert json.loads((tmp_path / "b" / "store.json").read_text())["done"] == 4
  monkeypatch.setattr(eagle_features, "_forward", real)
  resumed = eagle_features.compute(target, head, seqs, str(tmp_path / "b"), batch_size=4)
  for k in eagle.CACHED_KEYS:
    np.testing.assert_array_equal(resumed.arrays[k], whole.arrays[k])
  with pytest.raises(eagle.TrainError, match="differs in sequences"):
    eagle_features.compute(target, head, seqs[::-1], str(tmp_path / "a"))
  e1 = speculative.init_head(target, "eagle1")
  with pytest.raises(eagle.TrainError, match="differs in fuse_layers, kind"):
    eagle_features.compute(target, e1, seqs, str(tmp_path / "a"))
  with pytest.raises(eagle.TrainError, match="differs in top_k"):
    eagle_features.compute(target, head, seqs, str(tmp_path / "a"), top_k=5)
  with pytest.raises(eagle.TrainError, match="other sequences"):
    eagle_features.FeatureData(eagle_data.SequenceData(seqs[::-1], batch_size=B), whole)


def test_cli_trains_from_cached_features(setup, tmp_path):
  """train eagle --self-distill N --cache-features: the store is made in OUT/features, the
  loss falls; a batch whose stored features have the wrong width is refused by name; the
  flag without --self-distill exits 2."""
  out = tmp_path / "cf"
  flags = list(CLI_FLAGS)
  flags[flags.index("eagle1")] = "eagle3"
  code, _, err = train_eagle(
    setup, out, "--self-distill", 12, "--cache-features", "--ttt-steps", 3, *flags
  )
  assert code == 0, err
  meta = json.loads((out / "features" / "store.json").read_text())
  assert meta["done"] == meta["rows"] == 12 and meta["kind"] == "eagle3"
  records = metrics.read(str(out))
  assert np.mean(losses(records)[-5:]) < losses(records)[0]
  code, _, err = train_eagle(setup, tmp_path / "x", "--cache-features", *CLI_FLAGS)
  assert code == 2 and "--cache-features needs --self-distill N" in err
  target = setup[3]
  head = speculative.init_head(target, "eagle3")
  batch = text_data(setup).batch(0)
  D = target.cfg.d_model
  F = len(head.hc.fuse_layers) * D
  batch |= {
    "features": np.zeros((B, T, D), np.float32),
    "label_ids": np.zeros((B, T, 2), np.int32),
    "label_logits": np.zeros((B, T, 2), np.float32),
    "best": np.zeros((B, T), np.int32),
  }
  with pytest.raises(eagle.TrainError, match=rf"features must be \[B, T, F\] = \[{B}, {T}, {F}\]"):
    eagle.train(target, head, config(tmp_path / "bad", "eagle3"), [batch], progress=False)


def test_train_export_writes_a_kept_checkpoints_head(setup, cli_run, tmp_path):
  """`train export` of an eagle run's last checkpoint writes the head the run itself wrote
  at its end; it needs --target, and refuses a target of another config or a published
  layout for a kvjax-architecture head."""
  _, target_dir, _, target = setup
  out, summary = cli_run
  flags = ("export", "--run", out, "--step", STEPS, "--target", target_dir)
  code, stdout, err = run_cli(*flags, "--out", tmp_path / "h", "--json")
  assert code == 0, err
  got = json.loads(stdout)
  assert (got["kind"], got["format"], got["step"]) == ("eagle1", "kvjax", STEPS)
  a = speculative.load_head(str(tmp_path / "h"), target)
  b = speculative.load_head(summary["export"], target)
  assert a.hc == b.hc
  for x, y in zip(jax.tree.leaves(a.params()), jax.tree.leaves(b.params()), strict=True):
    np.testing.assert_array_equal(x, y)
  code, _, err = run_cli("export", "--run", out, "--step", STEPS)
  assert code == 2 and "--target names its model" in err
  code, _, err = run_cli(*flags, "--format", "eagle1", "--out", tmp_path / "p")
  assert code == 1 and "kvjax's own" in err
  other = tmp_path / "other"
  lm.save(tiny.model("llama", n_layers=3), str(other))
  code, _, err = run_cli("export", "--run", out, "--step", STEPS, "--target", other)
  assert code == 1 and "differ from one for this target" in err, err
