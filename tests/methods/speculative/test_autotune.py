"""The default draft tree (`speculative.default_tree`): measured once per device, model and
head, cached, and used by `kvjax generate` / `kvjax stream` when no tree flag is given (plain
decoding when no tree was faster)."""

import json
import os

import pytest
from helpers import cli

from kvjax import lm, speculative
from kvjax.lm import tiny
from kvjax.speculative import autotune
from kvjax.speculative.tree import TreeSpec

CANDIDATES = (
  TreeSpec(top_k=1, depth=2, total_tokens=3),
  TreeSpec(top_k=2, depth=2, total_tokens=4),
)
PROMPTS = ["Hello there, friend", "The quick brown fox"]


@pytest.fixture(scope="module")
def model():
  return tiny.model("llama", n_layers=2)


@pytest.fixture(scope="module")
def head(model):
  return speculative.init_head(model, "eagle1", seed=1)


def test_measured_once_then_read_from_the_cache(model, head, tmp_path, monkeypatch):
  logged = []
  kw = dict(candidates=CANDIDATES, max_new_tokens=6, root=str(tmp_path), log=logged.append)
  tree = speculative.default_tree(model, head, PROMPTS, **kw)
  entry = json.loads((tmp_path / autotune.FILE).read_text())[autotune.key_of(model, head)]
  table = entry["table"]
  assert [r["tree"] for r in table] == [None] + [autotune._fields(c) for c in CANDIDATES]
  best = max(table, key=lambda r: r["vs_plain"])  # the median ratio of alternating passes
  best = best["tree"] if best["vs_plain"] >= autotune.MARGIN else None
  assert tree == (None if best is None else TreeSpec(**best))
  assert all(r["tokens_per_s"] > 0 for r in table) and table[0]["vs_plain"] == 1.0
  assert logged[0].startswith("timing the default tree: plain decoding")
  assert logged[-1].startswith("default tree: ")

  def never(*a, **k):
    raise AssertionError("measured again")

  monkeypatch.setattr(autotune, "measure", never)
  assert speculative.default_tree(model, head, PROMPTS, **kw) == tree
  assert "default tree from" in logged[-1]
  other = speculative.init_head(model, "eagle1", seed=2)  # another head: another entry
  with pytest.raises(AssertionError, match="measured again"):
    speculative.default_tree(model, other, PROMPTS, **kw)
  with pytest.raises(AssertionError, match="measured again"):  # sampling: another entry
    speculative.default_tree(model, head, PROMPTS, sampling=lm.Sampling(temperature=1.0), **kw)


def test_sampled_timing_samples(model, head, tmp_path):
  """A sampled setting is timed sampling (the rows' token counts are the limit either way)."""
  t = lm.Sampling(temperature=0.9, top_k=20)
  e = autotune.measure(
    model, head, PROMPTS[:1], candidates=CANDIDATES[:1], max_new_tokens=5, sampling=t
  )
  assert [r["tree"] for r in e["table"]] == [None, autotune._fields(CANDIDATES[0])]
  assert autotune.key_of(model, head, t).endswith("T0.9/k20/p1|B1")
  assert autotune.key_of(model, head).endswith("greedy|B1")


def test_timed_at_the_callers_batch(model, head, tmp_path, monkeypatch):
  """batch=B times runs of B rows that take every prompt once (the last filled from the
  first) and is stored apart from batch 1; a batch that is not an int >= 1 is refused."""
  rows = []
  real = autotune.plain_generate

  def counted(m, prompts, **kw):
    rows.append(list(prompts))
    return real(m, prompts, **kw)

  monkeypatch.setattr(autotune, "plain_generate", counted)
  three = PROMPTS + ["A third one"]
  kw = dict(candidates=CANDIDATES[:1], max_new_tokens=4, root=str(tmp_path))
  chosen = speculative.default_tree(model, head, three, batch=2, **kw)
  # a warm-up, then REPEATS passes of the two runs (and REPEATS more to confirm a winner)
  passes = autotune.REPEATS * (1 + (chosen is not None))
  assert rows == [three[:2]] + [three[:2], [three[2], three[0]]] * passes
  stored = json.loads((tmp_path / autotune.FILE).read_text())
  assert list(stored) == [autotune.key_of(model, head, None, 2)]
  assert autotune.key_of(model, head, None, 2).endswith("greedy|B2")
  with pytest.raises(ValueError, match="batch must be an int >= 1; got 0"):
    autotune.measure(model, head, PROMPTS, batch=0)


def test_a_corrupt_cache_is_measured_again(model, head, tmp_path, monkeypatch):
  (tmp_path / autotune.FILE).write_text("{not json")
  entry = dict(tree=autotune._fields(CANDIDATES[0]), table=[], measured="now")
  monkeypatch.setattr(autotune, "measure", lambda *a, **k: entry)
  assert speculative.default_tree(model, head, root=str(tmp_path)) == CANDIDATES[0]
  assert json.loads((tmp_path / autotune.FILE).read_text()) == {autotune.key_of(model, head): entry}


@pytest.mark.parametrize("choice", [None, CANDIDATES[1]])
def test_cli_without_tree_flags_uses_the_measured_default(model, head, tmp_path, choice):
  """The cached choice decides: a tree, or plain decoding (JSON tree null); the text is plain
  greedy decoding's either way."""
  lm.save(model, str(tmp_path / "m"))
  speculative.save_head(head, str(tmp_path / "h"))
  root = os.environ["KVJAX_CACHE_DIR"]
  loaded = lm.load(str(tmp_path / "m"))
  entry = dict(tree=None if choice is None else autotune._fields(choice), table=[], measured="x")
  autotune._write(
    root, autotune.key_of(loaded, speculative.load_head(str(tmp_path / "h"), loaded)), entry
  )
  args = ("generate", "--model", tmp_path / "m", "--prompt", PROMPTS[0], "--max-new-tokens", 10)
  code, out, err = cli(*args, "--speculative", "eagle", "--head", tmp_path / "h", "--json")
  assert code == 0, err
  got = json.loads(out)
  assert got["tree"] == entry["tree"] and "default tree from" in err
  assert got["tokens"] == lm.generate(model, PROMPTS[0], max_new_tokens=10).tokens
  assert (got["mean_accept_len"] is None) == (choice is None)
  code, out, err = cli(
    "stream", "--model", tmp_path / "m", "--prompt", PROMPTS[0], "--max-new-tokens", 10,
    "--speculative", "eagle", "--head", tmp_path / "h", "--json",
  )  # fmt: skip
  assert code == 0, err
  assert json.loads(out)["tree"] == entry["tree"]


@pytest.mark.parametrize("tree_s, chosen", [(0.97, False), (0.9, True)])
def test_a_tree_within_the_margin_of_plain_is_not_chosen(model, head, monkeypatch, tree_s, chosen):
  """The median pass decides, and a tree must beat plain decoding by MARGIN (5%): 1.03x
  keeps plain decoding, 1.11x takes the tree."""
  import types

  def fake(seconds):
    return lambda *a, **k: types.SimpleNamespace(stats={"decode_s": seconds, "new_tokens": 10})

  monkeypatch.setattr(autotune, "plain_generate", fake(1.0))
  monkeypatch.setattr(autotune, "generate", fake(tree_s))
  got = autotune.measure(model, head, PROMPTS, candidates=CANDIDATES[:1])
  assert got["table"][1]["vs_plain"] == pytest.approx(1.0 / tree_s)
  assert got["tree"] == (autotune._fields(CANDIDATES[0]) if chosen else None)


def test_a_winner_faked_by_a_load_spike_is_not_kept(model, head, monkeypatch):
  """The fastest shape is timed again: plain decoding slowed by a spike during its first
  passes (the shape 1.25x) but as fast as it in the confirming passes keeps plain decoding;
  a shape fast in both sets is kept."""
  import types

  for confirmed_s, chosen in ((1.0, False), (0.8, True)):
    calls = {"tree": 0}

    def tree_run(*a, confirmed_s=confirmed_s, calls=calls, **k):
      calls["tree"] += 1  # the warm-up, REPEATS passes, then the confirming passes
      s = 0.8 if calls["tree"] <= 1 + autotune.REPEATS else confirmed_s
      return types.SimpleNamespace(stats={"decode_s": s, "new_tokens": 10})

    plain = types.SimpleNamespace(stats={"decode_s": 1.0, "new_tokens": 10})
    monkeypatch.setattr(autotune, "plain_generate", lambda *a, plain=plain, **k: plain)
    monkeypatch.setattr(autotune, "generate", tree_run)
    got = autotune.measure(model, head, PROMPTS[:1], candidates=CANDIDATES[:1])
    row = got["table"][1]
    assert row["vs_plain"] == pytest.approx(1.25)
    assert row["confirmed_vs_plain"] == pytest.approx(1.0 / confirmed_s)
    assert got["tree"] == (autotune._fields(CANDIDATES[0]) if chosen else None)
