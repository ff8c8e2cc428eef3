"""Products of low-precision operands accumulated in float32, on every backend.

Attention scores, attention values and the LM head multiply bfloat16 (or float16) operands into
a float32 result: GPU tensor cores and the TPU MXU do that natively, and it is their fast path.
XLA's CPU backend does not always: which bf16 x bf16 -> f32 dots it runs depends on their shape
and fusion, and the others fail at run time with `UNIMPLEMENTED: Unsupported element type for
DotThunk::Execute: BF16 x BF16 = F32` (e.g. probabilities [B, K, G, T, S] times a shared
prefix's values [K, S, H], whose batch axis K is not leading). `einsum_f32` lowers to the native
mixed-precision dot on every platform but CPU, and on CPU upcasts the operands to float32 first:
the product of two bfloat16 (or float16) numbers is exact in float32, so both compute the same
sums (up to their order). The choice is made per lowering platform (`jax.lax.platform_dependent`),
so a program exported or compiled for a GPU/TPU from a CPU host keeps the native dot. Float32
operands (or one float32 operand: it promotes the other) take a plain dot, with no platform
switch in the program.

Not for the inside of a Pallas kernel: Triton lowers no platform switch, and a kernel's own dots
are its semantics (`splits.dot_nt`, `splits.online_step` with values=None).
"""

import jax
import jax.numpy as jnp


def einsum_f32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) with float32 products and accumulation, returned in float32."""
  if jnp.dtype(jnp.result_type(a, b)).itemsize >= 4:  # float32 (or wider): nothing to choose
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

  def native(a, b):
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

  def upcast(a, b):
    return jnp.einsum(spec, a.astype(jnp.float32), b.astype(jnp.float32))

  return jax.lax.platform_dependent(a, b, cpu=upcast, default=native)
