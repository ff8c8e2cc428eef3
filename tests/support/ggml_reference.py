"""ggml's dequantizers, ported element by element from ggml-quants.c's dequantize_row_* (the
reference C, no SIMD), in float32 with C's order of operations: an independent check of the
vectorised gguf.quants.dequantize that kvjax reads GGUF tensors with.

`dequantize(raw, qtype)` takes the bytes of whole blocks ([rows, bytes per row], uint8) and
returns float32 [rows, values per row]. Block layouts (QK_K = 256):

    Q4_0  d:f16, qs[16]                        Q4_1  d:f16, m:f16, qs[16]
    Q5_0  d:f16, qh[4], qs[16]                 Q5_1  d:f16, m:f16, qh[4], qs[16]
    Q8_0  d:f16, qs[32]:int8
    Q2_K  scales[16], qs[64], d:f16, dmin:f16
    Q3_K  hmask[32], qs[64], scales[12], d:f16
    Q4_K  d:f16, dmin:f16, scales[12], qs[128]
    Q5_K  d:f16, dmin:f16, scales[12], qh[32], qs[128]
    Q6_K  ql[128], qh[64], scales[16]:int8, d:f16
"""

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

f32 = np.float32


def _f16(b: np.ndarray, at: int) -> np.float32:
  return f32(b[at : at + 2].view(np.float16)[0])


def _q4_0(b, y):
  d = _f16(b, 0)
  for j in range(16):
    y[j] = f32((int(b[2 + j]) & 0x0F) - 8) * d
    y[j + 16] = f32((int(b[2 + j]) >> 4) - 8) * d


def _q4_1(b, y):
  d, m = _f16(b, 0), _f16(b, 2)
  for j in range(16):
    y[j] = f32(int(b[4 + j]) & 0x0F) * d + m
    y[j + 16] = f32(int(b[4 + j]) >> 4) * d + m


def _q5(b, y, with_min: bool):
  d = _f16(b, 0)
  m = _f16(b, 2) if with_min else None
  at = 4 if with_min else 2
  qh = int.from_bytes(bytes(b[at : at + 4]), "little")
  for j in range(16):
    x0 = (int(b[at + 4 + j]) & 0x0F) | (((qh >> j) << 4) & 0x10)
    x1 = (int(b[at + 4 + j]) >> 4) | ((qh >> (j + 12)) & 0x10)
    if with_min:
      y[j], y[j + 16] = f32(x0) * d + m, f32(x1) * d + m
    else:
      y[j], y[j + 16] = f32(x0 - 16) * d, f32(x1 - 16) * d


def _q8_0(b, y):
  d = _f16(b, 0)
  qs = b[2:34].view(np.int8)
  for j in range(32):
    y[j] = f32(qs[j]) * d


def _q2_k(b, y):
  scales, q, d, dmin = b[0:16], b[16:80], _f16(b, 80), _f16(b, 82)
  k, s = 0, 0
  for n in range(2):  # two halves of 128 values, 32 bytes of qs each
    for shift in (0, 2, 4, 6):
      for half in (0, 16):
        sc = int(scales[s])
        s += 1
        dl, ml = d * f32(sc & 0xF), dmin * f32(sc >> 4)
        for l in range(16):
          y[k] = dl * f32((int(q[32 * n + half + l]) >> shift) & 3) - ml
          k += 1


def _q3_k_scales(raw: np.ndarray) -> list[int]:
  """The 16 6-bit scales of a Q3_K block, unpacked from 12 bytes."""
  out = []
  for j in range(16):
    low = int(raw[j]) & 0xF if j < 8 else int(raw[j - 8]) >> 4
    high = (int(raw[8 + j % 4]) >> (2 * (j // 4))) & 3
    out.append((low | (high << 4)) - 32)
  return out


def _q3_k(b, y):
  hmask, q, d = b[0:32], b[32:96], _f16(b, 108)
  scales = _q3_k_scales(b[96:108])
  k, s, m = 0, 0, 1
  for n in range(2):
    for shift in (0, 2, 4, 6):
      for half in (0, 16):
        dl = d * f32(scales[s])
        s += 1
        for l in range(16):
          v = (int(q[32 * n + half + l]) >> shift) & 3
          v -= 0 if int(hmask[half + l]) & m else 4
          y[k] = dl * f32(v)
          k += 1
      m <<= 1


def _k4_scale_min(j: int, q: np.ndarray) -> tuple[int, int]:
  """get_scale_min_k4: sub-block j's 6-bit scale and min from the 12 packed bytes."""
  if j < 4:
    return int(q[j]) & 63, int(q[j + 4]) & 63
  return (int(q[j + 4]) & 0xF) | ((int(q[j - 4]) >> 6) << 4), (int(q[j + 4]) >> 4) | (
    (int(q[j]) >> 6) << 4
  )


def _q45_k(b, y, high_bit: bool):
  d, dmin, scales = _f16(b, 0), _f16(b, 2), b[4:16]
  qh, qs = (b[16:48], b[48:176]) if high_bit else (None, b[16:144])
  k, u1, u2 = 0, 1, 2
  for n in range(4):  # 64 values per step: the low nibbles of 32 bytes, then the high ones
    for sub, shift, u in ((2 * n, 0, u1), (2 * n + 1, 4, u2)):
      sc, mn = _k4_scale_min(sub, scales)
      d1, m1 = d * f32(sc), dmin * f32(mn)
      for l in range(32):
        v = (int(qs[32 * n + l]) >> shift) & 0xF
        if high_bit and int(qh[l]) & u:
          v += 16
        y[k] = d1 * f32(v) - m1
        k += 1
    u1, u2 = u1 << 2, u2 << 2


def _q6_k(b, y):
  ql, qh, sc, d = b[0:128], b[128:192], b[192:208].view(np.int8), _f16(b, 208)
  for n in range(2):
    for l in range(32):
      i = l // 16
      lo, hi = 64 * n, 32 * n
      q1 = ((int(ql[lo + l]) & 0xF) | (((int(qh[hi + l]) >> 0) & 3) << 4)) - 32
      q2 = ((int(ql[lo + l + 32]) & 0xF) | (((int(qh[hi + l]) >> 2) & 3) << 4)) - 32
      q3 = ((int(ql[lo + l]) >> 4) | (((int(qh[hi + l]) >> 4) & 3) << 4)) - 32
      q4 = ((int(ql[lo + l + 32]) >> 4) | (((int(qh[hi + l]) >> 6) & 3) << 4)) - 32
      for off, s, q in ((0, 0, q1), (32, 2, q2), (64, 4, q3), (96, 6, q4)):
        y[128 * n + l + off] = d * f32(sc[8 * n + i + s]) * f32(q)


BLOCKS = {
  T.Q4_0: _q4_0,
  T.Q4_1: _q4_1,
  T.Q5_0: lambda b, y: _q5(b, y, with_min=False),
  T.Q5_1: lambda b, y: _q5(b, y, with_min=True),
  T.Q8_0: _q8_0,
  T.Q2_K: _q2_k,
  T.Q3_K: _q3_k,
  T.Q4_K: lambda b, y: _q45_k(b, y, high_bit=False),
  T.Q5_K: lambda b, y: _q45_k(b, y, high_bit=True),
  T.Q6_K: _q6_k,
}


def dequantize(raw: np.ndarray, qtype) -> np.ndarray:
  """float32 [rows, values] of raw [rows, bytes] in qtype (see the module docstring)."""
  if qtype == T.F32:
    return raw.view(np.float32).copy()
  if qtype == T.F16:
    return raw.view(np.float16).astype(np.float32)
  if qtype == T.BF16:  # the high 16 bits of a float32
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
  block, size = GGML_QUANT_SIZES[qtype]
  rows = raw.shape[0]
  out = np.zeros((rows, raw.shape[1] // size * block), np.float32)
  for r in range(rows):
    for k in range(raw.shape[1] // size):
      BLOCKS[qtype](raw[r, k * size : (k + 1) * size], out[r, k * block : (k + 1) * block])
  return out
