"""The `kvjax` command line: `generate` against the library on a tiny random model."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import jax
import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import cli as cli_module

PROMPT = "Once upon a time"
MAX = 12
FIELDS = {
  "tokens",
  "text",
  "prompt_tokens",
  "finish",
  "prefill_s",
  "decode_tokens_per_s",
  "compile_s",
  "model",
  "temperature",
  "top_k",
  "top_p",
  "seed",
  "max_new_tokens",
}


@pytest.fixture(scope="module")
def model(model_dir):
  return lm.load(model_dir)


def cli_json(model_dir, *argv, stdin=None):
  """`kvjax generate --model DIR ARGV --json`: stdout must be exactly one JSON object."""
  code, out, err = cli("generate", "--model", model_dir, *argv, "--json", stdin=stdin)
  assert code == 0, err
  return json.loads(out)


@pytest.fixture(scope="module")
def greedy(model_dir):
  return cli_json(model_dir, "--prompt", PROMPT, "--max-new-tokens", MAX)


def test_json_matches_library(greedy, model, model_dir):
  assert set(greedy) >= FIELDS
  ref = lm.generate(model, [PROMPT], max_new_tokens=MAX)
  assert greedy["tokens"] == ref.tokens and greedy["text"] == ref.texts
  assert greedy["prompt_tokens"] == ref.prompt_tokens and greedy["finish"] == ref.finish
  assert len(greedy["tokens"][0]) == MAX and greedy["finish"] == ["length"]
  assert greedy["prefill_s"] > 0 and greedy["decode_tokens_per_s"] > 0
  assert greedy["model"] == model_dir and greedy["dtype"] == "float32"
  settings = greedy["temperature"], greedy["top_k"], greedy["top_p"], greedy["seed"]
  assert settings == (0, 0, 1, None)


def test_stream_text_equals_json_text(greedy, model_dir):
  code, out, err = cli(
    "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", MAX
  )
  assert code == 0, err
  assert out == greedy["text"][0] + "\n"
  assert f"{len(greedy['tokens'][0])} new tokens" in err and "prefill" in err


def test_prompt_from_stdin(greedy, model_dir):
  got = cli_json(model_dir, "--prompt", "-", "--max-new-tokens", MAX, stdin=PROMPT + "\n")
  assert got["prompt_tokens"] == greedy["prompt_tokens"] and got["tokens"] == greedy["tokens"]


def test_batch_of_two(model, model_dir):
  prompts = ["Hi", PROMPT + " there was"]
  argv = ["--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", MAX]
  got = cli_json(model_dir, *argv)
  ref = lm.generate(model, prompts, max_new_tokens=MAX)
  assert got["tokens"] == ref.tokens and got["text"] == ref.texts and len(got["tokens"]) == 2
  code, out, err = cli("generate", "--model", model_dir, *argv)
  assert code == 0, err
  assert out.index("[1/2] 'Hi'") < out.index(ref.texts[0]) < out.index("[2/2]")
  assert out.rstrip("\n").endswith(ref.texts[1])
  assert "tok/s" in err and "prefill" in err


def test_sampling_is_reproducible_by_seed(model, model_dir):
  argv = ["--prompt", PROMPT, "--max-new-tokens", MAX, "--temperature", "1.0", "--top-k", "50"]
  a = cli_json(model_dir, *argv, "--seed", "3")
  b = cli_json(model_dir, *argv, "--seed", "3")
  c = cli_json(model_dir, *argv, "--seed", "4")
  assert a["tokens"] == b["tokens"] != c["tokens"]
  ref = lm.generate(
    model,
    [PROMPT],
    max_new_tokens=MAX,
    key=jax.random.key(3),
    sampling=lm.Sampling(temperature=1.0, top_k=50),
  )
  assert a["tokens"] == ref.tokens
  assert (a["temperature"], a["top_k"], a["top_p"], a["seed"]) == (1.0, 50, 1.0, 3)


def test_stop_cuts_text(greedy, model_dir):
  text = greedy["text"][0]
  stop = next(ch for ch in text[1:] if ch != "\ufffd")  # random bytes: mostly invalid UTF-8
  got = cli_json(model_dir, "--prompt", PROMPT, "--max-new-tokens", MAX, "--stop", stop)
  assert got["text"] == [text[: text.index(stop)]] and got["finish"] == ["stop_string"]
  assert got["tokens"][0] == greedy["tokens"][0][: len(got["tokens"][0])]
  assert len(got["tokens"][0]) < MAX and got["stop"] == [stop]


def test_chat(model, model_dir):
  # "Hi" keeps the templated prompt + MAX in the greedy run's cache bucket (one compile less).
  got = cli_json(model_dir, "--prompt", "Hi", "--max-new-tokens", MAX, "--chat")
  ref = lm.generate(model, ["Hi"], max_new_tokens=MAX, chat=True)
  assert got["chat"] is True and got["prompt_tokens"] == ref.prompt_tokens
  assert got["tokens"] == ref.tokens
  assert model.tokenizer.decode(got["prompt_tokens"][0]) == "<|user|>Hi<|assistant|>"


def test_dtype_casts_params(model_dir):
  args = argparse.Namespace(model=model_dir, dtype="bfloat16")
  assert cli_module.load_model(args).dtype == jax.numpy.bfloat16


@pytest.mark.parametrize(
  "flags, words",
  [
    (["--temperature", "-1"], ["--temperature", ">= 1e-6"]),
    (
      ["--temperature", "1e-9"],
      ["--temperature", "0 (greedy decoding) or a finite number >= 1e-6"],
    ),
    (["--temperature", "inf"], ["--temperature", "finite"]),
    (["--temperature", "hot"], ["--temperature", "'hot'"]),
    (["--temperature", "1", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["--temperature", "1", "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
    (["--temperature", "1", "--top-k", "-1"], ["--top-k", ">= 0"]),
    (["--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
    (["--top-k", "5"], ["--top-k", "--temperature > 0"]),
    (["--temperature", "0", "--top-p", "0.9"], ["--top-p", "--temperature > 0"]),
    (["--dtype", "float16"], ["--dtype", "bfloat16"]),
    (["--prompt", "-"], ["--prompt -", "once"]),
    (["--stop", ""], ["--stop", "non-empty"]),
  ],
)
def test_invalid_flags_exit_2(model_dir, flags, words):
  code, out, err = cli("generate", "--model", model_dir, "--prompt", "-", *flags)
  assert code == 2 and out == ""
  assert "kvjax generate: error:" in err
  for w in words:
    assert w in err


def test_usage_errors(model_dir):
  assert cli()[0] == 2
  code, out, err = cli("generate", "--model", "no-such-model", "--prompt", "x")
  assert code == 1 and out == "" and "no-such-model" in err and "bundled model name" in err
  code, out, _ = cli("generate", "--help")
  assert code == 0 and "--max-new-tokens" in out


def _corrupt_tensor(path):
  with open(os.path.join(path, "model.safetensors"), "wb") as f:
    f.write(b"\x00garbage")
  return "model.safetensors"


def _unknown_model_type(path):
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({**config, "model_type": "gpt9"}, f)
  return "config.json"


def _missing(path):
  shutil.rmtree(path)
  return os.path.basename(path)


@pytest.mark.parametrize("breaker", [_corrupt_tensor, _unknown_model_type, _missing])
def test_broken_model_exit_1(model_dir, tmp_path, breaker):
  path = str(tmp_path / "model")
  shutil.copytree(model_dir, path)
  file = breaker(path)
  code, out, err = cli("generate", "--model", path, "--prompt", PROMPT)
  assert code == 1 and out == ""
  assert err.startswith("kvjax: error: ") and file in err
  assert "Traceback" not in err and err.count("\n") == 1


def test_prompt_longer_than_context_exit_1(model_dir):
  code, out, err = cli(
    "generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 5000
  )
  assert code == 1 and out == ""
  assert err.startswith("kvjax: error: ") and "context of 1024" in err


def test_python_dash_m_entry_point(greedy, model_dir):
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "kvjax",
      "generate",
      "--model",
      model_dir,
      "--prompt",
      PROMPT,
      "--max-new-tokens",
      str(MAX),
      "--json",
    ],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "XLA_FLAGS": ""},
  )
  assert proc.returncode == 0, proc.stderr
  got = json.loads(proc.stdout)
  assert got["tokens"] == greedy["tokens"] and got["text"] == greedy["text"]


def test_bench_peers_interleaved(model):
  """lm.bench.run with peers: each peer is called on the same prompts as kvjax, cell by cell
  within every round, and gets its median, ratio and (decode) share of the bound; markdown has
  a pair of columns per peer; a peer may not take kvjax's name."""
  from kvjax.lm import bench

  grid = bench.Grid(batches=(2,), contexts=(8,), prefill=(6,), new_tokens=2, repeats=2)
  calls = []

  def peer(name, seconds):
    def fn(kind, ids, new_tokens):
      calls.append((name, kind, ids.shape, new_tokens, ids.sum()))
      return seconds

    return fn

  report = bench.run(model, grid, peers={"a": peer("a", 0.5), "b": peer("b", 2.0)})
  assert report["peers"] == ["a", "b"]
  # the warm-up round calls the peers on the first cell only (kvjax compiles per cell; they
  # do not), then 2 rounds x 2 cells x 2 peers, a before b, same ids for both
  cells = (("decode", (2, 8)), ("prefill", (1, 6)))
  assert [c[:4] for c in calls] == [(n, "decode", (2, 8), 2) for n in "ab"] + [
    (n, k, s, 2) for _ in range(2) for k, s in cells for n in "ab"
  ]
  assert all(calls[i][4] == calls[i + 1][4] for i in range(0, len(calls), 2))
  for c in report["cells"]:
    assert c["peers"]["a"]["s"] == 0.5 and c["peers"]["b"]["runs"] == [2.0, 2.0]
    assert c["peers"]["b"]["ratio"] == pytest.approx(2.0 / c["kvjax_s"])
    if c["kind"] == "decode":
      assert c["peers"]["a"]["fraction"] == pytest.approx(c["bound_s"] / 0.5)
  table = bench.markdown(report)
  assert "a ms/step | kvjax speed / a | b ms/step" in table and "b tokens/s | kvjax / b" in table
  with pytest.raises(ValueError, match="cannot be named 'kvjax'"):
    bench.run(model, grid, peers={"kvjax": peer("x", 1.0)})


def test_bench(model_dir):
  """kvjax bench: one decode cell and one prefill cell, with the bound from the bandwidth it
  measured; text and JSON; a grid past the context and bad lists are one-line errors."""
  small = ("--contexts", "8", "--prefill", "8", "--new-tokens", "2", "--repeats", "1")
  code, out, err = cli("bench", "--model", model_dir, "--batches", "1,2", *small, "--json")
  assert code == 0, err
  report = json.loads(out)
  assert report["bandwidth_gbs"]["copy"] > 0 and report["bandwidth_gbs"]["read"] > 0
  decode = [c for c in report["cells"] if c["kind"] == "decode"]
  assert [(c["batch"], c["length"]) for c in decode] == [(1, 8), (2, 8)]
  for c in decode:
    assert c["kvjax_s"] > 0 and c["fraction"] > 0 and c["bytes_per_step"]["kv"] > 0
    assert c["bound_s"] == pytest.approx(
      c["bytes_per_step"]["total"] / (report["bandwidth_gbs"]["copy"] * 1e9)
    )
  assert decode[1]["bytes_per_step"]["kv"] == 2 * decode[0]["bytes_per_step"]["kv"]
  code, out, err = cli("bench", "--model", model_dir, "--batches", "1", *small)
  assert code == 0 and "kvjax share of bound" in out and "prefill tokens" in out
  code, _, err = cli("bench", "--model", model_dir, "--contexts", "1020", "--new-tokens", "8")
  assert code == 1 and "the grid needs 1028 positions" in err and "model's 1024 positions" in err
  code, _, err = cli("bench", "--model", model_dir, "--batches", "1,x")
  assert code == 2 and "comma-separated integers" in err
