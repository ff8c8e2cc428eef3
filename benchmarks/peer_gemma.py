"""The gemma library's sampler (PyPI `gemma`) as a peer of benchmarks/decode.py, in its own
virtual environment.

    python peer_gemma.py serve --shape '{"vocab_size": 8192, ...}' --dtype float32 --seed 0

Builds `gm.nn.Transformer` with a Gemma-2 config of the given shape (alternating local sliding /
global layers, attention and final logit soft-caps, post-attention and post-FFN norms, query
scaled by 1/sqrt(head_dim), tied embeddings: what HF's Gemma2Config of the same fields
describes, so kvjax runs an equal model), random params, and answers peer_protocol requests
with the library's own sampling code, as `gm.text.Sampler.sample` runs it minus the tokenizer:
  prefill (one prompt of P tokens): `gm.text._prefill.prefill` (the cache of P + 1 slots, one
      forward of the prompt) and the first greedy token, to the host.
  decode (B prompts of C tokens, N steps): after an untimed prefill, the jitted
      `SamplerLoop._sample_loop` (one `lax.while_loop` of cached steps, greedy) for N tokens
      with no end tokens, so every row runs every step; compilation excluded by a warm call of
      the same shapes.
"""

from __future__ import annotations

import argparse
import json
import time


def build(shape: dict, dtype: str, seed: int):
  import jax
  import jax.numpy as jnp
  from gemma import gm

  local, glob = gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL
  n_layers = shape["num_hidden_layers"]
  config = gm.nn.config.TransformerConfig(
    num_embed=shape["vocab_size"],
    embed_dim=shape["hidden_size"],
    hidden_dim=shape["intermediate_size"],
    num_heads=shape["num_attention_heads"],
    head_dim=shape["head_dim"],
    num_kv_heads=shape["num_key_value_heads"],
    final_logit_softcap=shape["final_logit_softcapping"],
    attn_logits_soft_cap=shape["attn_logit_softcapping"],
    sliding_window_size=shape["sliding_window"],
    attention_types=tuple(local if i % 2 == 0 else glob for i in range(n_layers)),
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    query_pre_attn_norm=gm.nn.config.QueryPreAttentionNormalisation.BY_ONE_OVER_SQRT_HEAD_DIM,
  )
  model = gm.nn.Transformer(config=config)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  return model, params


class Runner:
  def __init__(self, model, params):
    import jax
    import jax.numpy as jnp
    from gemma.gm.text import _prefill, _sampler_loop, _sampling, _tokenizer
    from gemma.gm.utils import _types

    self.jax, self.jnp, self.model, self.params = jax, jnp, model, params
    self._prefill, self._types = _prefill, _types
    self.loop = lambda cache_length: _sampler_loop.SamplerLoop(
      model=model,
      end_tokens=(),
      forbidden_tokens=None,
      sampling=_sampling.Greedy(),
      cache_length=cache_length,
      special_tokens=_tokenizer.Gemma2Tokenizer.special_tokens,
    )
    self.warm = set()

  def state(self, ids, new_tokens: int):
    tokens = self.jnp.asarray(ids, self.jnp.int32)
    cache_length = tokens.shape[1] + new_tokens
    inputs = self._types.Input(text=tokens, images=None, config=self.model.config.input_config)
    state = self._prefill.prefill(
      model=self.model,
      params=self.params,
      input=inputs,
      last_state=None,
      cache_length=cache_length,
      max_out_length=new_tokens,
      pad_length=None,
      rng=self.jax.random.PRNGKey(0),
      sharding=None,
    )
    return state, cache_length

  def prefill(self, ids) -> float:
    t0 = time.perf_counter()
    state, _ = self.state(ids, 1)
    self.jax.device_get(state.last_token)
    return time.perf_counter() - t0

  def decode(self, ids, new_tokens: int) -> float:
    state, cache_length = self.state(ids, new_tokens)
    loop = self.loop(cache_length)
    run = lambda s: loop.sample(
      params=self.params,
      init_state=s,
      max_new_tokens=self.jnp.asarray(new_tokens),
    )
    self.jax.block_until_ready(state)
    key = (len(ids), len(ids[0]), new_tokens)
    if key not in self.warm:  # compile the loop for these shapes, outside the timing
      self.jax.block_until_ready(run(state).predicted_tokens)
      self.warm.add(key)
    t0 = time.perf_counter()
    out = run(state)
    steps = int(out.step)
    seconds = time.perf_counter() - t0
    if steps != new_tokens:
      raise RuntimeError(f"the sampler ran {steps} steps, not {new_tokens}")
    return seconds / new_tokens


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/peer_gemma.py", description=__doc__.split("\n")[0]
  )
  sub = ap.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("serve", help="answer timing requests on stdin/stdout")
  s.add_argument("--shape", required=True, help="the HF Gemma2Config fields, as JSON")
  s.add_argument("--dtype", default="float32")
  s.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  import gemma
  import jax
  from peer_protocol import serve

  model, params = build(json.loads(args.shape), args.dtype, args.seed)
  runner = Runner(model, params)
  info = dict(
    gemma=getattr(gemma, "__version__", "?"),
    jax=jax.__version__,
    devices=[str(d) for d in jax.devices()],
    n_params=sum(x.size for x in jax.tree.leaves(params)),
  )
  serve(info, runner.decode, runner.prefill)


if __name__ == "__main__":
  main()
