"""Logits that become NaN or infinite are an error, never silent output: every generation,
scoring and method loop carries a flag out of its jitted code and the host raises
`lm.NonFiniteError` once per call; the CLI prints it as one line."""

import numpy as np
import pytest
from helpers import cli

from kvjax import coprocessor, lm, speculative
from kvjax.lm import sot, streaming, tiny

PROMPT = "to be or not"


@pytest.fixture(scope="module")
def clean():
  return tiny.model(n_layers=1)


def poisoned(model, token: int):
  """The model with token's embedding row NaN: finite until that token is fed."""
  params = model.params()
  embed = np.array(params["embed"])
  embed[token] = np.nan
  params["embed"] = embed
  return model.with_params(params)


@pytest.fixture(scope="module")
def late(clean):
  """A model that turns non-finite mid-generation: the 4th greedy token of PROMPT (absent from
  the prompt) has a NaN embedding, so the logits after it are NaN inside the decode loop."""
  ids = clean.tokenizer.encode(PROMPT)
  out = lm.generate(clean, PROMPT, max_new_tokens=16, stop_tokens=()).tokens[0]
  step = next(i for i, t in enumerate(out) if i >= 3 and t not in ids)
  return poisoned(clean, out[step]), step


@pytest.fixture(scope="module")
def early(clean):
  """A model whose prompt already holds a NaN embedding (the prefill's logits are NaN)."""
  return poisoned(clean, clean.tokenizer.encode(PROMPT)[2])


def raises(fn, *words):
  with pytest.raises(lm.NonFiniteError) as err:
    fn()
  for w in ("NaN or infinite", *words):
    assert w in str(err.value)


def test_the_clean_model_runs(clean, late):
  """The premise: the same calls succeed on the clean model, and the poisoned one generates
  the clean tokens up to the poisoned one."""
  model, step = late
  out = lm.generate(clean, PROMPT, max_new_tokens=16, stop_tokens=())
  assert len(out.tokens[0]) == 16 and np.isfinite(lm.score(clean, out.tokens[0])).all()
  pieces, done = [], {}
  s = streaming.Session(model, n_sink=2, window=32, stop_tokens=())
  with pytest.raises(lm.NonFiniteError):
    for p in s.turn(PROMPT, max_new_tokens=16, done=done):
      pieces.append(p)
  assert done["ids"] == out.tokens[0][: step + 1]  # the tokens up to the poisoned one came out


def test_generate_and_its_streams_raise(late, early):
  model, step = late
  raises(
    lambda: lm.generate(model, [PROMPT, "ab"], max_new_tokens=16, stop_tokens=()),
    "generate",
    "row(s) [0]",
  )
  pieces = []
  with pytest.raises(lm.NonFiniteError, match=f"generate_iter \\(token {step + 1}\\)"):
    for p in lm.generate_iter(model, PROMPT, max_new_tokens=16, stop_tokens=()):
      pieces.append(p)
  raises(lambda: lm.generate(early, PROMPT, max_new_tokens=4), "generate")
  raises(lambda: lm.score(early, early.tokenizer.encode(PROMPT)), "score")


def test_streaming_session_and_perplexity_raise(late, early):
  model, step = late
  s = streaming.Session(model, n_sink=2, window=32, stop_tokens=())
  with pytest.raises(lm.NonFiniteError, match=f"streaming session \\(token {step + 1}\\)"):
    "".join(s.turn(PROMPT, max_new_tokens=16))
  ids = early.tokenizer.encode(PROMPT * 3)
  for cache in ("sink", "dense", "window", "recompute"):
    raises(lambda c=cache: streaming.perplexity(early, ids, cache=c, window=8), "perplexity")


def test_method_loops_raise(clean, late, early):
  model, _ = late
  head = speculative.init_head(clean, "eagle1", seed=1)
  raises(
    lambda: speculative.generate(model, head, [PROMPT], max_new_tokens=16, stop_tokens=()),
    "speculative generate",
  )
  raises(
    lambda: sot.expand(model, [PROMPT, PROMPT + " b"], max_new_tokens=16, stop_tokens=()),
    "point expansion",
  )
  cop = coprocessor.init(clean, 2, init="lora")
  for delay in (0, 3):  # latents before the last prompt token, or 3 tokens late
    raises(
      lambda d=delay: coprocessor.generate(
        early, cop, PROMPT, max_new_tokens=16, delay=d, stop_tokens=()
      )
    )


def test_cli_prints_one_line(early, tmp_path):
  path = str(tmp_path / "nan")
  lm.save(early, path)
  code, out, err = cli(
    "generate", "--model", path, "--no-check-finite", "--prompt", PROMPT, "--max-new-tokens", "4"
  )
  assert code == 1 and out == "" and len(err.strip().splitlines()) == 1, err
  assert "NaN or infinite" in err and "Traceback" not in err
