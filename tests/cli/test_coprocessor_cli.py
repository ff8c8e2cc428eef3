"""`kvjax generate --coprocessor`, `kvjax ppl --coprocessor` and `python -m kvjax.train
coprocessor` on a tiny random model, against the library."""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import coprocessor as cp
from kvjax import lm
from kvjax.coprocessor import traces
from kvjax.lm import tiny
from kvjax.train.cli import main as train_main

TEXT = (
  "Now is the winter of our discontent made glorious summer by this sun of York; "
  "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
) * 3


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("cop")
  lm.save(tiny.model(), str(root / "model"))
  base = lm.load(str(root / "model"))
  cp.save(cp.init(base, 3, seed=1), str(root / "cop"))
  (root / "text.txt").write_text(TEXT)
  return {k: str(root / k) for k in ("model", "cop", "text.txt")} | {"root": root}


def test_generate_matches_the_library(dirs):
  code, out, err = cli(
    "generate",
    "--model",
    dirs["model"],
    "--coprocessor",
    dirs["cop"],
    "--prompt",
    "Now is the",
    "--max-new-tokens",
    8,
    "--delay",
    1,
    "--json",
  )
  assert code == 0, err
  got = json.loads(out)
  base = lm.load(dirs["model"])
  want = cp.generate(base, cp.load(dirs["cop"], base), "Now is the", max_new_tokens=8, delay=1)
  assert got["tokens"] == want.tokens and got["coprocessor"] == dirs["cop"]
  assert got["delay"] == 1


def test_ppl_by_position_matches_the_library(dirs):
  files = ("--model", dirs["model"], "--coprocessor", dirs["cop"], "--text", dirs["text.txt"])
  argv = ("ppl", *files, "--ahead", 4, "--points", 3, "--seq-len", 32)
  code, out, err = cli(*argv, "--json")
  assert code == 0, err
  got = json.loads(out)
  for key in ("ppl_base_by_position", "ppl_aug_by_position", "relative_reduction_by_position"):
    assert len(got[key]) == 4
  base = lm.load(dirs["model"])
  ids = base.tokenizer.encode(TEXT)
  n = -(-(len(ids) - 1) // 32)
  windows = np.full((n, 33), -1)
  for r in range(n):
    w = ids[r * 32 : r * 32 + 33]
    windows[r, : len(w)] = w
  want = traces.by_position(base, cp.load(dirs["cop"], base), windows, ahead=4, points=3)
  np.testing.assert_allclose(got["ppl_aug_by_position"], want.ppl_aug, rtol=1e-5)
  np.testing.assert_allclose(got["ppl_base_by_position"], want.ppl_base, rtol=1e-5)
  code, out, err = cli(*argv)
  assert code == 0 and "reduction" in out, err


@pytest.mark.parametrize(
  "argv,words",
  [
    (["generate", "--prompt", "x", "--delay", "1"], "--delay applies only with --coprocessor"),
    (["generate", "--prompt", "x", "--coprocessor", "nope"], "not a coprocessor directory"),
    (
      [
        "generate",
        "--prompt",
        "x",
        "--coprocessor",
        "COP",
        "--delay",
        "9",
        "--max-new-tokens",
        "9",
      ],
      "--delay 9 must be smaller than --max-new-tokens 9",
    ),
    (
      ["ppl", "--text", "TEXT", "--coprocessor", "COP", "--cache", "sink"],
      "streaming-cache flags do not apply",
    ),
    (
      ["ppl", "--text", "TEXT", "--coprocessor", "COP", "--ahead", "32", "--seq-len", "32"],
      "--ahead (32) must be smaller than --seq-len (32)",
    ),
    (
      ["ppl", "--text", "TEXT", "--window", "8", "--ahead", "4"],
      "--ahead apply only with --coprocessor",
    ),
  ],
)
def test_flag_errors_exit_2(dirs, argv, words):
  argv = [dirs["cop"] if a == "COP" else dirs["text.txt"] if a == "TEXT" else a for a in argv]
  code, _, err = cli(*argv[:1], "--model", dirs["model"], *argv[1:])
  assert code == 2 and words in err, err


def test_coprocessor_for_another_base_exit_1(dirs, tmp_path):
  other = str(tmp_path / "other")
  lm.save(tiny.model(n_layers=3), other)
  code, _, err = cli("generate", "--model", other, "--coprocessor", dirs["cop"], "--prompt", "x")
  assert code == 1 and "made for another base model" in err and "n_layers" in err, err


def run_train(*argv):
  import contextlib
  import io

  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = train_main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def test_train_cli_runs_and_saves(dirs):
  out = dirs["root"] / "run"
  code, stdout, err = run_train(
    "coprocessor",
    "--base",
    dirs["model"],
    "--latents",
    2,
    "--text",
    dirs["text.txt"],
    "--seq-len",
    24,
    "--ahead",
    4,
    "--points",
    3,
    "--batch-size",
    2,
    "--steps",
    3,
    "--warmup",
    1,
    "--kind",
    "pause",
    "--out",
    out,
    "--no-progress",
    "--json",
  )
  assert code == 0, err
  summary = json.loads(stdout)
  assert summary["kind"] == "pause" and summary["n_params"] == 2 * 64
  back = cp.load(summary["export"], lm.load(dirs["model"]))
  assert back.cc.kind == "pause" and back.n_latents == 2
  assert (out / "metrics.jsonl").exists() and (out / "loss.png").exists()


@pytest.mark.parametrize(
  "argv,words",
  [
    (
      ["--latents", "2", "--ahead", "24", "--seq-len", "24"],
      "--ahead (24) must be smaller than --seq-len (24)",
    ),
    (["--latents", "0"], "--latents: expected an integer >= 1; got 0"),
    ([], "--latents N is required"),
    (["--latents", "2", "--kind", "pause", "--init", "lora"], "--init and --lora-rank apply"),
    (
      ["--latents", "2", "--points", "30", "--seq-len", "24", "--ahead", "4"],
      "30 points need 30 distinct positions in [1, --seq-len - --ahead - --delay] = [1, 20]",
    ),
  ],
)
def test_train_flag_errors_exit_2(dirs, argv, words):
  code, _, err = run_train(
    "coprocessor",
    "--base",
    dirs["model"],
    "--text",
    dirs["text.txt"],
    "--out",
    str(dirs["root"] / "bad"),
    *argv,
  )
  assert code == 2 and words in err, err
