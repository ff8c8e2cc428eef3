"""`einsum_f32`: float32 products and accumulation of low-precision operands on every backend,
the native mixed-precision dot for GPU/TPU and upcast operands for XLA's CPU backend."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from kvjax.pallas_kernels.precision import einsum_f32

# (spec, lhs shape, rhs shape): attention's dots over a shared prefix (rhs [K, S, H], no batch
# axis) and over per-row keys, and the LM head
CASES = [
  ("bkgtn,knh->bkgth", (2, 2, 4, 3, 5), (2, 5, 8)),  # BF16 x BF16 = F32 fails natively on CPU
  ("bkgth,knh->bkgtn", (2, 2, 4, 3, 8), (2, 5, 8)),
  ("bkgtn,bknh->bkgth", (2, 2, 4, 3, 5), (2, 2, 5, 8)),
  ("...d,dv->...v", (2, 3, 16), (16, 40)),
]
DOT = re.compile(
  r"stablehlo\.dot_general .*: \(tensor<\S*x(\w+)>, tensor<\S*x(\w+)>\) -> tensor<\S*x(\w+)>"
)


def operands(spec_shapes, dtype, seed=0):
  rng = np.random.default_rng(seed)
  return [jnp.asarray(rng.standard_normal(s), dtype) for s in spec_shapes]


def dots(fn, args, platform: str) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every dot_general of fn lowered for `platform`."""
  shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
  text = export.export(jax.jit(fn), platforms=[platform])(*shapes).mlir_module()
  return DOT.findall(text)


@pytest.mark.parametrize("spec, a, b", CASES)
def test_bfloat16_operands_give_exact_products_summed_in_float32(spec, a, b):
  """On this CPU: the products of two bfloat16 numbers are exact in float32, so the result is
  the float64 einsum of the same numbers up to float32 summation."""
  x, y = operands((a, b), jnp.bfloat16)
  got = jax.jit(lambda x, y: einsum_f32(spec, x, y))(x, y)
  assert got.dtype == jnp.float32
  want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(y, np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, a, b", CASES)
def test_each_platform_gets_its_dot(spec, a, b):
  """Lowered for GPU and TPU the dot keeps bfloat16 operands (their fast path, float32
  result); for CPU its operands are float32. The choice is the lowering platform's, so a
  program exported from this CPU machine for a GPU keeps the native dot."""
  args = operands((a, b), jnp.bfloat16)
  fn = lambda x, y: einsum_f32(spec, x, y)
  assert dots(fn, args, "cpu") == [("f32", "f32", "f32")]
  for platform in ("cuda", "tpu"):
    assert dots(fn, args, platform) == [("bf16", "bf16", "f32")]


def test_float32_operands_take_one_plain_dot():
  """Float32 operands (the float32 path): the same single dot as jnp.einsum, no platform
  switch in the program, bit for bit the same result."""
  x, y = operands(CASES[0][1:], jnp.float32)
  spec = CASES[0][0]
  jaxpr = str(jax.make_jaxpr(lambda x, y: einsum_f32(spec, x, y))(x, y))
  assert "cond" not in jaxpr and "platform_index" not in jaxpr
  want = jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  np.testing.assert_array_equal(np.asarray(einsum_f32(spec, x, y)), np.asarray(want))


def test_mixed_operands_and_float16():
  """bfloat16 x float32 computes in float32; float16 operands are upcast on CPU too."""
  spec, a, b = CASES[0]
  x, y = operands((a, b), jnp.bfloat16)
  want = np.einsum(spec, np.asarray(x, np.float64), np.asarray(y, np.float64))
  for lhs, rhs in ((x, y.astype(jnp.float32)), (x.astype(jnp.float32), y)):
    np.testing.assert_allclose(np.asarray(einsum_f32(spec, lhs, rhs)), want, rtol=1e-5, atol=1e-5)
  h = [jnp.asarray(np.asarray(z, np.float32), jnp.float16) for z in (x, y)]
  got = jax.jit(lambda x, y: einsum_f32(spec, x, y))(*h)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_gradients_flow_in_the_operands_dtype():
  """Reverse mode through the CPU branch (training in bfloat16): cotangents in the operands'
  dtype, equal to the float32 computation's rounded to bfloat16."""
  spec, a, b = CASES[0]
  x, y = operands((a, b), jnp.bfloat16)
  w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 2, 4, 3, 8)), jnp.float32)
  loss = lambda x, y: jnp.sum(einsum_f32(spec, x, y) * w)
  gx, gy = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, y)
  assert gx.dtype == gy.dtype == jnp.bfloat16
  f32 = [z.astype(jnp.float32) for z in (x, y)]
  wx, wy = jax.grad(loss, argnums=(0, 1))(*f32)
  for got, want in ((gx, wx), (gy, wy)):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=2**-8)
