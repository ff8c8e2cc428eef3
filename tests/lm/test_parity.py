"""kvjax against Hugging Face transformers, for every supported family (float32, CPU).

The tiny models (hf_models) have O(1) logits, so dropping any family feature from kvjax (qkv
bias, scaled embeddings, a sliding window, RoPE scaling, either soft-cap; Qwen3's and Gemma 3's
q/k norms, Gemma 3's local RoPE base, its post norms and query scalar) moves its logits by
0.4 or more against the 1e-4 tolerance, and changes its greedy tokens (all but the final
soft-cap, which is monotone and cannot change an argmax).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_models import prompts

from kvjax import lm
from kvjax.cache import KVCache
from kvjax.lm import steps


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """The tiny models run 10x faster in torch on one thread than on a shared CPU's two."""
  n = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pair(hf_dir):
  """family -> (kvjax model, transformers model) loaded from the same checkpoint."""
  import transformers

  made = {}

  def get(family):
    if family not in made:
      path = hf_dir(family)
      made[family] = (lm.load(path), transformers.AutoModelForCausalLM.from_pretrained(path).eval())
    return made[family]

  return get


def hf_logits(hf, tokens):
  with torch.inference_mode():
    return hf(torch.tensor(tokens)).logits.numpy()


TOKENS = np.array(prompts(lengths=(24, 24)))  # longer than the sliding windows (12)


def test_full_sequence_logits(pair, family):
  model, hf = pair(family)
  err = np.abs(lm.score(model, TOKENS) - hf_logits(hf, TOKENS)).max()
  assert err <= 1e-4, f"max |logit error| {err:.3g}"


def test_prefill_then_decode_equals_score(pair, family):
  """Prefill 10 tokens, then decode the rest one at a time (past the sliding windows): each
  step's logits are `lm.score`'s of the whole row (the full-sequence test's rows, scored by
  the same program)."""
  model, _ = pair(family)
  ids = TOKENS[0].tolist()
  ref = lm.score(model, TOKENS)[0]
  cache = KVCache.init(
    n_layers=model.cfg.n_layers,
    batch=1,
    size=64,
    n_kv_heads=model.cfg.n_kv_heads,
    head_dim=model.cfg.head_dim,
  )
  tokens = np.zeros((1, 32), np.int32)
  tokens[0, :10] = ids[:10]
  logits, cache = steps.prefill(
    model.graphdef, model.state, cache, jnp.asarray(tokens), jnp.array([10], jnp.int32)
  )
  got = [np.asarray(logits[0])]
  for t in ids[10:-1]:
    logits, cache = steps.decode_step(model.graphdef, model.state, cache, jnp.array([t]))
    got.append(np.asarray(logits[0]))
  assert int(cache.length[0]) == len(ids) - 1
  np.testing.assert_allclose(np.stack(got), ref[9:-1], atol=1e-4, rtol=0)


ROWS = prompts(lengths=(7, 3, 18, 11))  # + 32 new tokens: past the sliding windows (12)


def test_greedy_matches_hf_generate(pair, family):
  """A batch of greedy rows equals transformers' generate of each row alone."""
  model, hf = pair(family)
  with torch.inference_mode():
    ref = [
      hf.generate(
        torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
      )[0, len(ids) :].tolist()
      for ids in ROWS
    ]
  out = lm.generate(model, ROWS, max_new_tokens=32, stop_tokens=[])
  assert out.tokens == ref
  assert out.finish == ["length"] * len(ROWS)


def test_batch_rows_equal_unbatched(pair, family):
  model, _ = pair(family)
  batched = lm.generate(model, ROWS, max_new_tokens=32, stop_tokens=[]).tokens
  for row, got in zip(ROWS, batched):
    assert got == lm.generate(model, row, max_new_tokens=32, stop_tokens=[]).tokens[0]


def test_n_params_match_hf(pair, family):
  model, hf = pair(family)
  assert model.cfg.n_params == sum(p.numel() for p in hf.parameters())


def test_hidden_states_match_hf(pair, family):
  """layer_inputs[l] is HF's hidden_states[l]; `hidden` is HF's last (final-normed) state."""
  model, hf = pair(family)
  tokens = np.array(prompts(lengths=(16,)))  # longer than the sliding windows (12)
  forward = jax.jit(lambda state, t: nnx.merge(model.graphdef, state)(t, return_layer_inputs=True))
  out, _ = forward(model.state, jnp.asarray(tokens))  # one program, not one per operation
  with torch.inference_mode():
    ref = hf(torch.tensor(tokens), output_hidden_states=True).hidden_states
  for l in range(model.cfg.n_layers):
    np.testing.assert_allclose(out.layer_inputs[l], ref[l].numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out.hidden, ref[-1].numpy(), atol=1e-4, rtol=0)


def test_bfloat16_error_no_worse_than_hf(hf_dir):
  """bf16 logits sit as close to the float32 truth as transformers' own bf16 run does."""
  import transformers

  path = hf_dir("llama")
  model = lm.load(path, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  tokens = np.array(prompts(lengths=(16,)))
  truth = lm.score(lm.load(path), tokens)
  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
  with torch.inference_mode():
    hf_err = np.abs(hf(torch.tensor(tokens)).logits.float().numpy() - truth).mean()
  ours = lm.score(model, tokens)
  assert ours.dtype == np.float32
  assert 0 < np.abs(ours - truth).mean() <= 2 * hf_err
  out = lm.generate(model, prompts(lengths=(5,))[0], max_new_tokens=8, stop_tokens=[])
  assert len(out.tokens[0]) == 8
