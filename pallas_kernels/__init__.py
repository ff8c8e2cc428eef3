"""Pallas kernels, each beside its plain-XLA `reference` and one dispatch function that picks
Pallas on GPU/TPU and the reference elsewhere. Imports only JAX.

sink_attention.py: `sink_attention`, T queries over a StreamingLLM sink cache (positions
  assigned inside the cache, keys rotated on the fly).
tree_attention.py: `tree_attention`, an EAGLE draft tree verified against a dense cache and
  its own ancestry in one softmax.
splits.py: what both share: the online-softmax step, the grid (row, kv head, key split) call
  and the flash-decoding merge of its splits; `NEG`, the finite -inf.
rope.py: `apply`, the rotary embedding the kernels (and the decoder) apply.
precision.py: `einsum_f32`, low-precision operands multiplied with float32 accumulation on
  every backend (the references', the attention's and the LM head's matmuls).
"""
