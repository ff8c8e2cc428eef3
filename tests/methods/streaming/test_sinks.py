"""The attention-sink diagnostic (`kvjax.lm.streaming.sinks`, `kvjax sinks`)."""

import json

import numpy as np
import pytest
from helpers import cli

from kvjax import lm
from kvjax.lm import tiny
from kvjax.lm.streaming import sinks

IDS = list(np.random.default_rng(0).integers(2, 258, 70))


def test_mass_is_a_share_of_the_probability_and_windows_hide_the_sinks():
  """mass [L, N] in [0, 1], growing with sink_tokens; the uniform baseline is the mean of
  k / visible keys; on a sliding-window layer only queries within the window of the first
  tokens can see them, which bounds their mass, and its uniform baseline counts that."""
  model = tiny.model("gemma2")  # layer 0: window 32, layer 1: global
  T = len(IDS)
  r1, r4 = (sinks.attention_mass(model, IDS, sink_tokens=k) for k in (1, 4))
  assert r4.mass.shape == (2, 4) and (r4.mass >= 0).all() and (r4.mass <= 1).all()
  assert (r4.mass * (T - 4) >= r1.mass * (T - 1) - 1e-5).all()  # more sinks, more mass
  t = np.arange(4, T)
  assert r4.uniform[1] == pytest.approx(np.mean(4 / (t + 1)))
  # window 32: a query at t sees keys > t - 32, so only t < 35 see any of keys 0..3
  assert (r4.mass[0] * (T - 4) <= (35 - 4) + 1e-4).all()
  seen = np.minimum(t + 1, 32)
  visible_sinks = np.clip(4 - (t + 1 - seen), 0, 4)
  assert r4.uniform[0] == pytest.approx(np.mean(visible_sinks / seen))
  json.dumps(r4.to_json())


def test_bad_input():
  model = tiny.model()
  with pytest.raises(ValueError, match="more than sink_tokens=4"):
    sinks.attention_mass(model, IDS[:4])
  with pytest.raises(ValueError, match="sink_tokens must be an int >= 1"):
    sinks.attention_mass(model, IDS, sink_tokens=0)
  with pytest.raises(ValueError, match="outside \\[0, 258\\)"):
    sinks.attention_mass(model, IDS + [999])
  with pytest.raises(ValueError, match="context of 1024"):
    sinks.attention_mass(model, IDS * 20)


def test_cli_json_text_and_png(tmp_path):
  model_dir = str(tmp_path / "m")
  lm.save(tiny.model(), model_dir)
  text = tmp_path / "t.txt"
  text.write_text("To be, or not to be, that is the question. " * 4, encoding="utf-8")
  png = tmp_path / "s.png"
  code, out, err = cli(
    "sinks", "--model", model_dir, "--text", str(text), "--png", str(png), "--json"
  )
  assert code == 0, err
  got = json.loads(out)
  want = sinks.attention_mass(
    lm.load(model_dir), lm.load(model_dir).tokenizer.encode(text.read_text())
  )
  np.testing.assert_allclose(got["mass"], want.mass, rtol=1e-5)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  code, out, _ = cli("sinks", "--model", model_dir, "--text", str(text), "--tokens", "40")
  assert code == 0 and "layer  1:" in out and "uniform" in out
  code, _, err = cli("sinks", "--model", model_dir, "--text", str(text), "--tokens", "9999")
  assert code == 1 and "the text has only" in err
  code, _, err = cli("sinks", "--model", model_dir, "--text", str(tmp_path / "none.txt"))
  assert code == 2 and "no such file" in err
  (tmp_path / "bad.txt").write_bytes(b"\xff\xfe bad")
  code, _, err = cli("sinks", "--model", model_dir, "--text", str(tmp_path / "bad.txt"))
  assert code == 1 and "not UTF-8" in err and len(err.strip().splitlines()) == 1


def test_mass_matches_transformers_attentions(hf_dir):
  """Gemma 3 (q/k norms, local layers with their own RoPE base, a sliding window): each
  layer's mass is transformers' attention probabilities on the first tokens."""
  import torch
  import transformers

  path = hf_dir("gemma3_text")
  ids = IDS[:40]
  got = sinks.attention_mass(lm.load(path), ids, sink_tokens=4).mass
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
  with torch.inference_mode():
    probs = hf.eval()(torch.tensor([ids]), output_attentions=True).attentions
  want = np.stack([p[0, :, 4:, :4].sum(-1).mean(-1).numpy() for p in probs])  # [L, N]
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
