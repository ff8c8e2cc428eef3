"""`kvjax sot` against the library on a tiny random model: JSON fields, streamed text, errors."""

import json

import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import sot

QUESTION = "How can I sleep better?"
SKELETON = r"1. Dark room\n2. Cool air\n3. No coffee late"
# the question with a supplied skeleton, 6 tokens per point: as `ref` runs it
SUPPLIED = ("--question", QUESTION, "--skeleton", SKELETON, "--point-tokens", 6)


@pytest.fixture(scope="module")
def ref(model_dir):
  """The library's answer to SUPPLIED."""
  return sot.run(
    lm.load(model_dir), QUESTION, skeleton=SKELETON.replace(r"\n", "\n"), point_tokens=6
  )


def test_json_matches_the_library(model_dir, ref):
  code, out, err = cli("sot", "--model", model_dir, *SUPPLIED, "--json")
  assert code == 0, err
  got = json.loads(out)
  assert got["points"] == ref.points == ["Dark room", "Cool air", "No coffee late"]
  assert got["answer"] == ref.answer and got["expansions"] == ref.expansions
  assert got["skeleton"] == "1. Dark room\n2. Cool air\n3. No coffee late"
  assert got["prefix_tokens_shared"] == ref.stats["prefix_tokens_shared"] > 40
  assert got["latency_s"] > 0 and got["sequential_latency_s"] > 0
  assert got["speedup"] == pytest.approx(got["sequential_latency_s"] / got["latency_s"])
  assert got["route"]["router"] == "supplied" and got["stats"]["mode"] == "sot"


def test_text_streams_the_points_in_order(model_dir, ref):
  code, out, err = cli("sot", "--model", model_dir, *SUPPLIED, "--repeat-prefix", "--no-baseline")
  assert code == 0, err
  assert (
    out
    == "\n".join(
      f"{i}. {p}{e}".rstrip() for i, (p, e) in enumerate(zip(ref.points, ref.expansions), 1)
    )
    + "\n"
  )
  assert "3 points" in err and "0 prefix tokens shared" in err and "normal answer" not in err


def test_router_never_answers_normally(model_dir):
  argv = ("--question", QUESTION, "--router", "never", "--answer-tokens", 5, "--json")
  code, out, err = cli("sot", "--model", model_dir, *argv)
  assert code == 0, err
  got = json.loads(out)
  assert got["stats"]["mode"] == "normal" and got["points"] == [] and got["speedup"] is None
  assert got["route"] == {"suitable": False, "router": "never", "reason": "router 'never'"}


@pytest.mark.parametrize(
  "argv,code,message",
  [
    (["--question", "  ", "--skeleton", SKELETON], 2, "--question is empty"),
    (["--question", QUESTION, "--skeleton", "no list here"], 1, "the skeleton has no points"),
    (
      ["--question", QUESTION, "--skeleton", SKELETON, "--max-points", 2],
      1,
      "the skeleton has 3 points, more than max_points=2 (--max-points)",
    ),
    (
      ["--question", QUESTION, "--skeleton", SKELETON, "--router", "rules"],
      2,
      "--router rules does not apply with --skeleton",
    ),
    (["--question", "-", "--skeleton", "-"], 2, "cannot both read stdin"),
    (["--question", QUESTION, "--router", "coin"], 2, "invalid choice: 'coin'"),
    (["--question", QUESTION, "--point-tokens", 0], 2, "expected an integer >= 1"),
  ],
)
def test_errors(model_dir, argv, code, message):
  got, out, err = cli("sot", "--model", model_dir, *argv)
  assert got == code and message in err and out == ""
