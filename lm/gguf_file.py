"""The GGUF container, llama.cpp's model file: metadata, tensor index and dequantized tensors.

A GGUF file (version 2 or 3, little-endian) is

    "GGUF", u32 version, u64 tensor count, u64 metadata count,
    metadata:     (string key, u32 value type, value) per entry,
    tensor index: (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset) per tensor,
    padding to `general.alignment` (default 32), then the tensors' bytes, each at its offset,

strings being a u64 byte count and UTF-8 bytes, and arrays a u32 item type, a u64 count and the
items. A tensor's dims run fastest-varying first (ggml's order): a torch Linear [out, in] is
stored with dims (in, out); `TensorInfo.shape` is numpy's order, [out, in].

`read` parses the header and index into Python values (a 262,144-token vocabulary in about a
second; `gguf.GGUFReader` takes over ten, one numpy view per string) and leaves the tensor bytes
memory-mapped; `GGUFFile.array` dequantizes one tensor to float32 with ggml's own Python
dequantizer (`gguf.quants.dequantize`). Every fault of the file is a `CheckpointError` naming the
file and the key or tensor at fault.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from kvjax.lm.checkpoint import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
T = GGMLQuantizationType
# The tensor types kvjax reads: the float types and the quantized ones of common llama.cpp files,
# each checked bit for bit against an independent dequantizer (tests/lm/test_gguf_quants.py).
TYPES = (
  T.F32,
  T.F16,
  T.BF16,
  T.Q8_0,
  T.Q4_0,
  T.Q4_1,
  T.Q5_0,
  T.Q5_1,
  T.Q2_K,
  T.Q3_K,
  T.Q4_K,
  T.Q5_K,
  T.Q6_K,
)
V = GGUFValueType
SCALARS = {  # value type -> (struct format, Python type)
  V.UINT8: ("<B", int),
  V.INT8: ("<b", int),
  V.UINT16: ("<H", int),
  V.INT16: ("<h", int),
  V.UINT32: ("<I", int),
  V.INT32: ("<i", int),
  V.UINT64: ("<Q", int),
  V.INT64: ("<q", int),
  V.FLOAT32: ("<f", float),
  V.FLOAT64: ("<d", float),
  V.BOOL: ("<?", bool),
}
ARRAY_DTYPES = {  # numeric array item type -> numpy dtype (a numeric array reads as an ndarray)
  V.UINT8: "<u1",
  V.INT8: "<i1",
  V.UINT16: "<u2",
  V.INT16: "<i2",
  V.UINT32: "<u4",
  V.INT32: "<i4",
  V.UINT64: "<u8",
  V.INT64: "<i8",
  V.FLOAT32: "<f4",
  V.FLOAT64: "<f8",
  V.BOOL: "?",
}
U64 = struct.Struct("<Q")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of the index: `shape` in numpy order (ggml's dims reversed), `offset` the
  absolute byte offset of its `nbytes` bytes in the file."""

  name: str
  shape: tuple[int, ...]
  type: GGMLQuantizationType
  offset: int
  nbytes: int


@dataclasses.dataclass(frozen=True)
class GGUFFile:
  """A parsed GGUF file: `metadata` maps each key to its value (int, float, bool, str, a numpy
  array for a numeric array, a list for an array of strings or of arrays); `tensors` maps each
  name to its TensorInfo, in file order; `data` is the whole file, memory-mapped."""

  path: str
  version: int
  metadata: dict[str, Any]
  tensors: dict[str, TensorInfo]
  data: np.ndarray = dataclasses.field(repr=False)

  def array(self, name: str) -> np.ndarray:
    """Tensor `name` dequantized to float32, in numpy order (a fresh, writable array)."""
    info = self.tensors[name]
    block, type_size = GGML_QUANT_SIZES[info.type]
    rows = info.shape[:-1]
    raw = self.data[info.offset : info.offset + info.nbytes].reshape(
      *rows, info.shape[-1] // block * type_size
    )
    w = dequantize(raw, info.type)  # a new array, but for F32 a view of the file
    return w.copy() if info.type == T.F32 else w


def read(path: str) -> GGUFFile:
  """Parses the GGUF file at `path` (its tensor bytes stay on disk until `array` reads them)."""
  path = os.fspath(path)
  if os.path.getsize(path) == 0:
    raise CheckpointError(f"{path}: empty file; expected a GGUF file")
  data = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
  cursor = _Cursor(memoryview(data), 0, path)
  magic = cursor.take(4, "the magic number")
  if magic != MAGIC:
    raise CheckpointError(f"{path}: not a GGUF file (magic {magic!r}; expected {MAGIC!r})")
  version = cursor.scalar(V.UINT32, "the version")
  if version not in VERSIONS:
    kind = " (big-endian?)" if version > 0xFFFF else ""
    raise CheckpointError(
      f"{path}: GGUF version {version}{kind} is not supported; kvjax reads little-endian "
      f"versions {VERSIONS}"
    )
  n_tensors = cursor.scalar(V.UINT64, "the tensor count")
  n_keys = cursor.scalar(V.UINT64, "the metadata count")
  metadata: dict[str, Any] = {}
  for k in range(n_keys):
    key = cursor.string(f"metadata key #{k}")
    if key in metadata:
      raise CheckpointError(f"{path}: metadata key {key!r} appears twice")
    metadata[key] = cursor.value(cursor.scalar(V.UINT32, key), key)
  index = [_tensor_entry(cursor, t) for t in range(n_tensors)]
  alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
  if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
    raise CheckpointError(f"{path}: general.alignment must be a power of two; got {alignment!r}")
  start = -(-cursor.pos // alignment) * alignment
  tensors = _place(index, start, alignment, data.size, path)
  return GGUFFile(path, version, metadata, tensors, data)


@dataclasses.dataclass
class _Cursor:
  """A read position in the file's bytes; a read past the end is a CheckpointError naming what
  was being read (the file is truncated)."""

  buf: memoryview
  pos: int
  path: str

  def take(self, n: int, what: str) -> bytes:
    end = self.pos + n
    if end > len(self.buf):
      raise _truncated(self.path, what, self.pos, end, len(self.buf))
    out = self.buf[self.pos : end].tobytes()
    self.pos = end
    return out

  def scalar(self, vtype: int, what: str):
    fmt, kind = SCALARS[vtype]
    return kind(struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0])

  def string(self, what: str) -> str:
    raw = self.take(self.scalar(V.UINT64, what), what)
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as err:
      raise CheckpointError(f"{self.path}: {what} is not valid UTF-8 ({err})") from None

  def value(self, vtype: int, key: str):
    """One metadata value of type vtype (`key` names it in errors)."""
    if vtype in SCALARS:
      return self.scalar(vtype, key)
    if vtype == V.STRING:
      return self.string(key)
    if vtype == V.ARRAY:
      item = self.scalar(V.UINT32, key)
      n = self.scalar(V.UINT64, key)
      if item in ARRAY_DTYPES:
        dtype = np.dtype(ARRAY_DTYPES[item])
        return np.frombuffer(self.take(n * dtype.itemsize, key), dtype=dtype)
      if item == V.STRING:
        return self.strings(n, key)
      return [self.value(item, f"{key}[{i}]") for i in range(n)]
    raise CheckpointError(f"{self.path}: metadata {key!r} has unknown value type {vtype}")

  def strings(self, n: int, key: str) -> list[str]:
    """An array of n strings, read in one tight loop (a vocabulary holds 100k+ of them)."""
    buf, pos, size, out = self.buf, self.pos, len(self.buf), []
    for i in range(n):
      end = pos + 8
      if end <= size:
        end += U64.unpack_from(buf, pos)[0]
      if end > size:
        raise _truncated(self.path, f"{key}[{i}]", pos, end, size)
      try:
        out.append(str(buf[pos + 8 : end], "utf-8"))
      except UnicodeDecodeError as err:
        raise CheckpointError(f"{self.path}: {key}[{i}] is not valid UTF-8 ({err})") from None
      pos = end
    self.pos = pos
    return out


def _truncated(path: str, what: str, lo: int, hi: int, size: int) -> CheckpointError:
  return CheckpointError(
    f"{path}: truncated: {what} needs bytes {lo}..{hi} but the file has {size}"
  )


def _tensor_entry(cursor: _Cursor, t: int) -> tuple[str, tuple[int, ...], int, int]:
  """(name, numpy shape, ggml type id, offset from the data start) of index entry t."""
  name = cursor.string(f"the name of tensor #{t}")
  n_dims = cursor.scalar(V.UINT32, f"tensor {name!r}")
  if not 1 <= n_dims <= 4:
    raise CheckpointError(f"{cursor.path}: tensor {name!r} has {n_dims} dims; GGUF allows 1 to 4")
  dims = [cursor.scalar(V.UINT64, f"tensor {name!r}") for _ in range(n_dims)]
  ggml_type = cursor.scalar(V.UINT32, f"tensor {name!r}")
  offset = cursor.scalar(V.UINT64, f"tensor {name!r}")
  return name, tuple(reversed(dims)), ggml_type, offset


def _place(
  index: list[tuple[str, tuple[int, ...], int, int]], start: int, alignment: int, size: int, path
) -> dict[str, TensorInfo]:
  """The index as TensorInfos at absolute offsets; refuses an unknown or unsupported type, a
  row that is not whole blocks, a duplicate name, a misaligned tensor and one past the end."""
  tensors: dict[str, TensorInfo] = {}
  for name, shape, type_id, offset in index:
    if type_id not in T._value2member_map_:
      raise CheckpointError(f"{path}: tensor {name!r} has unknown ggml type id {type_id}")
    ggml_type = T(type_id)
    if ggml_type not in TYPES:
      raise CheckpointError(
        f"{path}: tensor {name!r} has type {ggml_type.name}, which kvjax does not read; "
        f"supported: {', '.join(t.name for t in TYPES)}"
      )
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    if shape[-1] % block:
      raise CheckpointError(
        f"{path}: tensor {name!r} of type {ggml_type.name} has rows of {shape[-1]} values, "
        f"not a multiple of its block size {block}"
      )
    if name in tensors:
      raise CheckpointError(f"{path}: tensor {name!r} appears twice in the index")
    if offset % alignment:
      raise CheckpointError(
        f"{path}: tensor {name!r} is at offset {offset}, not a multiple of the alignment "
        f"{alignment}"
      )
    nbytes = int(np.prod(shape)) // block * type_size
    if start + offset + nbytes > size:
      raise _truncated(path, f"tensor {name!r}", start + offset, start + offset + nbytes, size)
    tensors[name] = TensorInfo(name, shape, ggml_type, start + offset, nbytes)
  return tensors
