"""No program of a bfloat16 model asks XLA's CPU backend for a bfloat16 x bfloat16 -> float32
dot, which it runs for some shapes and fails on others at run time (`UNIMPLEMENTED: ... DotThunk
BF16 x BF16 = F32`: the shared-prefix prefill of `kvjax sot` did); lowered for a GPU or TPU,
every matmul keeps bfloat16 operands (their fast path). Read from the programs lowered with
jax.export for each platform (nothing is compiled): the forward without a cache, prefill and
decode over the dense cache, a decode over a shared prefix (SoT), a StreamingLLM decode over a
sink cache, and the gradient of `kvjax train lm --bf16`'s loss (whose backward multiplies the
float32 cotangents of the attention's float32 scores in float32 on every platform: JAX's
transpose of a dot with a float32 result). `einsum_f32` (kvjax.pallas_kernels.precision) is
the one place that makes the choice."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kvjax.cache.prefix import PrefixCache
from kvjax.cache.sink import SinkCache
from kvjax.lm import steps, tiny
from kvjax.lm.attention import Training
from kvjax.lm.engine import new_cache
from kvjax.train import lm as train_lm

DOT = re.compile(
  r"stablehlo\.dot_general .*: \(tensor<\S*x(\w+)>, tensor<\S*x(\w+)>\) -> tensor<\S*x(\w+)>"
)
B, T = 2, 16


@pytest.fixture(scope="module", params=["llama", "gemma3_text"])
def models(request):
  """(the tiny model in bfloat16, in float32): gemma3_text adds a sliding-window layer and
  the tied head."""
  kw = {"windows": (6, 0)} if request.param == "gemma3_text" else {}
  m = tiny.model(request.param, n_layers=2, **kw)
  cast = lambda d: m.with_params(jax.tree.map(lambda a: a.astype(d), m.params()))
  return cast(jnp.bfloat16), cast(jnp.float32)


def programs(m16):
  """name -> (jitted fn, args) of each inference program a bfloat16 model runs."""
  tokens = jnp.zeros((B, T), jnp.int32)
  lengths = jnp.asarray([5, 9], jnp.int32)
  g, s = m16.graphdef, m16.state
  prefix = PrefixCache(prefix=new_cache(m16, 1, 32), rows=new_cache(m16, B, 32))
  sink = SinkCache.init(**m16.cfg.cache_dims, batch=B, n_sink=4, window=12, dtype=m16.dtype)
  return {
    "score": (steps.score, (g, s, tokens)),
    "prefill": (steps.prefill, (g, s, new_cache(m16, B, 32), tokens, lengths)),
    "decode": (steps.decode_step, (g, s, new_cache(m16, B, 32), tokens[:, 0])),
    "shared prefix": (steps.extend, (g, s, prefix, tokens, lengths)),
    "sink cache": (steps.nll_scan, (g, s, sink, tokens[:, :4], tokens[:, :4])),
  }


def dot_types(fn, args, platform: str) -> set[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of the dot_generals of fn(*args) lowered for
  platform."""
  text = export.export(fn, platforms=[platform])(*args).mlir_module()
  found = set(DOT.findall(text))
  assert found, "no dot_general found: the pattern no longer reads the module"
  return found


def test_no_bfloat16_to_float32_dot_on_cpu_and_no_float32_dot_on_gpu(models):
  m16, _ = models
  for name, (fn, args) in programs(m16).items():
    cpu = dot_types(fn, args, "cpu")
    assert ("bf16", "bf16", "f32") not in cpu, name
    assert ("f32", "f32", "f32") in cpu, name  # attention and head: upcast operands
    gpu = dot_types(fn, args, "cuda")
    assert all(lhs == rhs == "bf16" for lhs, rhs, _ in gpu), (name, gpu)
    assert ("bf16", "bf16", "f32") in gpu, name  # float32 accumulation kept


def test_training_in_bfloat16(models):
  """The gradient of `kvjax train lm --bf16`'s loss (float32 params, bfloat16 compute)."""
  _, m32 = models
  tokens = jnp.zeros((B, T), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones((B, T), jnp.float32)}

  def loss(params):
    nll = train_lm.forward_nll(m32, params, batch, True, Training())
    return train_lm.masked_loss(nll, batch["mask"])

  grad = jax.jit(jax.grad(loss))
  assert ("bf16", "bf16", "f32") not in dot_types(grad, (m32.params(),), "cpu")
  assert ("bf16", "bf16", "f32") in dot_types(grad, (m32.params(),), "cuda")


def test_the_float32_model_has_only_float32_dots(models):
  """The float32 path is unchanged: float32 dots only, on every platform."""
  _, m32 = models
  tokens = jnp.asarray(np.zeros((B, T), np.int32))
  for platform in ("cpu", "cuda"):
    assert dot_types(steps.score, (m32.graphdef, m32.state, tokens), platform) == {
      ("f32", "f32", "f32")
    }
