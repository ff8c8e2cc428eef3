"""Every tensor type kvjax reads from GGUF files, dequantized bit for bit as ggml's reference C
does (ggml_reference: an element-by-element port), through the file reader kvjax loads with."""

import ggml_reference
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from kvjax.lm import gguf_file

ROWS = 3


# byte offsets of each block's f16 scales (d, and dmin or m), set to finite values
SCALES = {
  T.Q4_0: (0,),
  T.Q4_1: (0, 2),
  T.Q5_0: (0,),
  T.Q5_1: (0, 2),
  T.Q8_0: (0,),
  T.Q2_K: (80, 82),
  T.Q3_K: (108,),
  T.Q4_K: (0, 2),
  T.Q5_K: (0, 2),
  T.Q6_K: (208,),
}


def random_tensor(qtype, rng) -> np.ndarray:
  """ROWS rows of two blocks (64 values for the float types) of qtype's bytes: random normal
  values, or random bytes with finite f16 scales."""
  if qtype in (T.F32, T.F16, T.BF16):
    values = rng.standard_normal((ROWS, 64)).astype(np.float32)
    if qtype == T.F32:
      return values.view(np.uint8)
    if qtype == T.F16:
      return values.astype(np.float16).view(np.uint8)
    return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
  _, size = gguf.GGML_QUANT_SIZES[qtype]
  raw = rng.integers(0, 256, (ROWS, 2, size), dtype=np.uint8)
  for at in SCALES[qtype]:
    scale = rng.uniform(-2, 2, (ROWS, 2)).astype(np.float16)
    raw[..., at : at + 2] = scale[..., None].view(np.uint8)
  return raw.reshape(ROWS, 2 * size)


@pytest.mark.parametrize("qtype", gguf_file.TYPES, ids=lambda t: t.name)
def test_dequantized_as_ggml_does(qtype, tmp_path):
  rng = np.random.default_rng(int(qtype))
  raw = random_tensor(qtype, rng)
  w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
  w.add_tensor("t", raw, raw_dtype=qtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  f = gguf_file.read(str(tmp_path / "t.gguf"))
  got = f.array("t")
  want = ggml_reference.dequantize(raw, qtype)
  assert got.dtype == np.float32 and got.shape == want.shape == f.tensors["t"].shape
  assert np.isfinite(want).all() and want.std() > 0
  np.testing.assert_array_equal(got, want)


def test_reference_matches_ggml_quantizer_round_trip():
  """The reference reads what gguf's own quantizer writes: Q8_0 of values on its grid (each
  block's largest magnitude 127 x 0.5, so its scale is 0.5 exactly)."""
  rng = np.random.default_rng(0)
  q = rng.integers(-127, 128, (2, 64)).astype(np.float32)
  q[:, ::32] = 127
  q *= np.float32(0.5)
  raw = gguf.quants.quantize(q, T.Q8_0)
  np.testing.assert_array_equal(ggml_reference.dequantize(raw, T.Q8_0), q)
