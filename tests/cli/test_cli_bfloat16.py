"""Every subcommand on a model stored in bfloat16 (and one cast with --dtype bfloat16), its output
checked against float32 on the same weights (the float32 copy holds the same numbers).

What a command reports as numbers or token ids is compared with the library in float32 within
the bfloat16 tolerances of tests/methods/test_bfloat16.py (TOL on logits and nll; each greedy
token within TOL of the best float32 logit after the same prefix). Where a command prints only
text (stream, sot, generate with a draft head or a coprocessor) it must equal the library's
bfloat16 run, which tests/methods/test_bfloat16.py checks against float32.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import cli

from kvjax import coprocessor, lm, speculative
from kvjax.lm import bench, sot, streaming, tiny
from kvjax.lm.streaming import sinks

TOL = 0.02  # logits and nll (tests/methods/test_bfloat16.py)
TEXT = "to be or not to be, that is the question: whether tis nobler in the mind to suffer " * 3
PROMPT = "to be or not to be"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """name -> directory: "bf16" a two-layer tiny llama stored in bfloat16, "f32" the same
  weights stored in float32, "receiver" a bfloat16 fine-tune of it (weights x 1.0625, exact),
  "head" an EAGLE-3 head and "cop" a coprocessor for it (bfloat16)."""
  root = tmp_path_factory.mktemp("bf16")
  m = tiny.model("llama", n_layers=2)
  m16 = m.with_params(jax.tree.map(lambda a: a.astype(jnp.bfloat16), m.params()))
  lm.save(m16, str(root / "bf16"))
  lm.save(
    m16.with_params(jax.tree.map(lambda a: a.astype(jnp.float32), m16.params())), str(root / "f32")
  )
  lm.save(m16.with_params(jax.tree.map(lambda a: a * 1.0625, m16.params())), str(root / "receiver"))
  speculative.save_head(speculative.init_head(m16, "eagle3", seed=1), str(root / "head"))
  coprocessor.save(coprocessor.init(m16, 4, seed=5), str(root / "cop"))
  (root / "text.txt").write_text(TEXT, encoding="utf-8")
  return {p.name: str(p) for p in root.iterdir()}


@pytest.fixture(scope="module")
def f32(dirs):
  """The float32 models of the same weights: (base, receiver)."""
  return lm.load(dirs["f32"]), lm.load(dirs["receiver"], dtype=jnp.float32)


def run_json(*argv):
  code, out, err = cli(*argv, "--json")
  assert code == 0, err
  assert "Traceback" not in err
  return json.loads(out)


def assert_near_greedy(m32, prompt, tokens):
  logits = np.asarray(lm.score(m32, list(prompt) + list(tokens)))
  rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
  gap = rows.max(-1) - rows[np.arange(len(tokens)), tokens]
  assert len(tokens) and (gap <= TOL).all(), gap


def mean_nll(m32, ids, last: int) -> float:
  """float32 mean next-token nll of ids' last `last` tokens."""
  logp = jax.nn.log_softmax(np.asarray(lm.score(m32, ids)), -1)
  return float(-np.mean([logp[t - 1, ids[t]] for t in range(len(ids) - last, len(ids))]))


def test_generate_stored_and_cast(dirs, f32):
  stored = run_json("generate", "--model", dirs["bf16"], "--prompt", PROMPT, "--max-new-tokens", 10)
  assert stored["dtype"] == "bfloat16"
  assert_near_greedy(f32[0], stored["prompt_tokens"][0], stored["tokens"][0])
  flags = ("--dtype", "bfloat16", "--prompt", PROMPT, "--max-new-tokens", 10)
  cast = run_json("generate", "--model", dirs["f32"], *flags)
  assert cast["dtype"] == "bfloat16" and cast["tokens"] == stored["tokens"]


def test_generate_with_a_draft_head_and_with_a_coprocessor(dirs):
  m16 = lm.load(dirs["bf16"])
  common = ("--prompt", PROMPT, "--max-new-tokens", 8)
  tree = ("--tree-top-k", 2, "--tree-depth", 2, "--tree-tokens", 4)
  spec = run_json(
    "generate",
    "--model",
    dirs["bf16"],
    "--speculative",
    "eagle",
    "--head",
    dirs["head"],
    *tree,
    *common,
  )
  head = speculative.load_head(dirs["head"], m16)
  spec_tree = speculative.TreeSpec(top_k=2, depth=2, total_tokens=4)
  want = speculative.generate(m16, head, PROMPT, max_new_tokens=8, tree=spec_tree)
  assert spec["tokens"] == want.tokens
  aug = run_json("generate", "--model", dirs["bf16"], "--coprocessor", dirs["cop"], *common)
  cop = coprocessor.load(dirs["cop"], m16)
  assert aug["text"] == coprocessor.generate(m16, cop, PROMPT, max_new_tokens=8).texts


def test_stream(dirs):
  got = run_json(
    "stream", "--model", dirs["bf16"], "--prompt", PROMPT, "--max-new-tokens", 8, "--window", 30
  )
  session = streaming.Session(lm.load(dirs["bf16"]), n_sink=4, window=30)
  assert got["turns"][0]["text"] == "".join(session.turn(PROMPT, max_new_tokens=8))


def test_ppl_and_sinks(dirs, f32):
  ids = f32[0].tokenizer.encode(TEXT)
  got = run_json(
    "ppl", "--model", dirs["bf16"], "--text", dirs["text.txt"], "--window", 30, "--no-progress"
  )
  want = streaming.perplexity(f32[0], ids, cache="sink", n_sink=4, window=30)
  assert got["tokens"] == len(ids) - 1
  assert abs(np.log(got["ppl"]) - np.mean(want.nll)) <= TOL
  got = run_json("sinks", "--model", dirs["bf16"], "--text", dirs["text.txt"], "--tokens", 60)
  want = sinks.attention_mass(f32[0], ids[:60], sink_tokens=4)
  np.testing.assert_allclose(got["mass"], want.mass, atol=TOL, rtol=0)


def test_sot(dirs):
  """The shared-prefix prefill that stopped `kvjax sot` with UNIMPLEMENTED on bfloat16."""
  skeleton = r"1. Dark room\n2. Cool air"
  flags = ("--question", "How?", "--skeleton", skeleton, "--point-tokens", 6, "--no-baseline")
  got = run_json("sot", "--model", dirs["bf16"], *flags)
  want = sot.run(
    lm.load(dirs["bf16"]), "How?", skeleton=skeleton.replace(r"\n", "\n"), point_tokens=6
  )
  assert got["prefix_tokens_shared"] > 0 and got["expansions"] == want.expansions


def test_droidspeak(dirs, f32):
  pair = ("--sender", dirs["bf16"], "--receiver", dirs["receiver"], "--prompt", TEXT[:60])
  flags = ("--plan", "1-2", "--eval-tokens", 8, "--max-new-tokens", 4, "--repeats", 1)
  got = run_json("droidspeak", "run", *pair, *flags)
  ids = f32[1].tokenizer.encode(TEXT[:60])
  assert abs(got["loss_full"] - mean_nll(f32[1], ids, 8)) <= TOL
  assert abs(got["loss_sender"] - mean_nll(f32[0], ids, 8)) <= TOL
  assert_near_greedy(f32[1], ids, got["tokens_full"])


def test_bench(dirs, f32):
  """A bfloat16 step reads half the bytes of a float32 one."""
  flags = ("--batches", 1, "--contexts", 16, "--prefill", 16, "--new-tokens", 2, "--repeats", 1)
  got = run_json("bench", "--model", dirs["bf16"], *flags)
  assert got["model"]["dtype"] == "bfloat16"
  decode, prefill = got["cells"]
  want = bench.step_bytes(f32[0], 1, decode["mean_context"])
  assert decode["bytes_per_step"] == {k: v / 2 for k, v in want.items()}
  assert decode["kvjax_s"] > 0 and prefill["kvjax_tok_s"] > 0
