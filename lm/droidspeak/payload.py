"""The DroidSpeak transfer payload: a sender's `Capture` as bytes, checked on arrival.

Layout (all integers little-endian):

    magic      8 bytes   b"KVJXDS01"
    n_header   uint32    length of the header
    header     n_header bytes of UTF-8 JSON:
                 format: 2 (format 1 stored K/V as [R, B, P, K, H]; 2 as [R, B, K, P, H],
                   the caches' layout)
                 fingerprint: {architecture, tokenizer, sender}: SHA-256 hex digests of the
                   model config (canonical JSON), the tokenizer (its JSON), the sender's params
                 plan: the plan as text ("1-3", "none", ...), n_layers
                 prefix: the token ids of each row (unpadded); padded: the sender's padded
                   length P (tensors hold the first max(len(row)) slots, decode pads to P);
                   positions: "arange"
                 dtype: the K/V/E dtype name
                 tensors: [{name, shape, offset, nbytes}] for k, v, e, offsets into the data
                 data_bytes, data_sha256: the length and SHA-256 of the data section
    data       data_bytes bytes: the tensors, C order, back to back

`decode` refuses, with a `PayloadError` that says what differs, a payload that is truncated or
corrupt (bad magic, header, length or checksum), or whose architecture, tokenizer, sender or
prefix is not the one the receiver expects. Over TCP it goes by `kvjax.lm.droidspeak.wire`.
"""

from __future__ import annotations

import hashlib
import json
import struct

import jax.numpy as jnp
import numpy as np

from kvjax.lm import config, engine
from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.droidspeak.reuse import Capture, DroidSpeakError, Plan

MAGIC = b"KVJXDS01"
FORMAT = 2
TENSORS = ("k", "v", "e")
SLOT_AXIS = {"k": 3, "v": 3, "e": 2}  # k, v [R, B, K, P, H]; e [G, B, P, D]


class PayloadError(ValueError):
  """A payload that is not for this receiver, or not a whole, intact payload."""


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def fingerprint(model, *, params: bool = True) -> dict[str, str]:
  """{architecture, tokenizer, sender}: digests of the config, the tokenizer JSON and (unless
  params=False) the params (`lm.params_fingerprint`), the `sender` entry that identifies the
  model's weights."""
  arch = json.dumps(config.to_dict(model.cfg), sort_keys=True).encode()
  tok = model.tokenizer.tok.to_str().encode() if model.tokenizer is not None else b""
  out = {"architecture": _sha(arch), "tokenizer": _sha(tok)}
  if params:
    out["sender"] = params_fingerprint(model)
  return out


def encode(sent: Capture, sender) -> bytes:
  """The payload of `sent`, captured by `sender` (a kvjax.lm.Model)."""
  lengths = np.asarray(sent.lengths)
  tokens = np.asarray(sent.tokens)
  n = int(lengths.max())  # slots past every row's prefix are padding: not sent
  arrays = {
    name: np.ascontiguousarray(
      np.take(np.asarray(getattr(sent, name)), np.arange(n), axis=SLOT_AXIS[name])
    )
    for name in TENSORS
  }
  dtype = arrays["k"].dtype
  tensors, offset, chunks = [], 0, []
  for name, a in arrays.items():
    raw = a.astype(dtype).tobytes()
    tensors.append({"name": name, "shape": list(a.shape), "offset": offset, "nbytes": len(raw)})
    chunks.append(raw)
    offset += len(raw)
  data = b"".join(chunks)
  header = {
    "format": FORMAT,
    "fingerprint": fingerprint(sender),
    "plan": str(sent.plan),
    "n_layers": sent.plan.n_layers,
    "prefix": [tokens[b, :n].tolist() for b, n in enumerate(lengths)],
    "padded": int(tokens.shape[1]),
    "positions": "arange",
    "dtype": str(dtype),
    "tensors": tensors,
    "data_bytes": len(data),
    "data_sha256": _sha(data),
  }
  head = json.dumps(header).encode()
  return MAGIC + struct.pack("<I", len(head)) + head + data


def read_header(payload: bytes) -> tuple[dict, bytes]:
  """(header, data) of a whole, intact payload; PayloadError otherwise."""
  if len(payload) < len(MAGIC) + 4 or payload[: len(MAGIC)] != MAGIC:
    raise PayloadError(
      f"not a kvjax DroidSpeak payload (expected magic {MAGIC!r}, got {payload[: len(MAGIC)]!r})"
    )
  (n,) = struct.unpack("<I", payload[len(MAGIC) : len(MAGIC) + 4])
  start = len(MAGIC) + 4
  if len(payload) < start + n:
    raise PayloadError(
      f"truncated payload: the header needs {n} bytes, {len(payload) - start} arrived"
    )
  try:
    header = json.loads(payload[start : start + n])
    want = int(header["data_bytes"])
  except (ValueError, KeyError, TypeError) as err:
    raise PayloadError(f"corrupt payload header ({type(err).__name__}: {err})") from None
  if header.get("format") != FORMAT:
    raise PayloadError(
      f"payload format version {header.get('format')!r}, but this kvjax reads "
      f"format version {FORMAT} only: re-send it from a sender running the "
      "same kvjax version"
    )
  data = payload[start + n :]
  if len(data) != want:
    raise PayloadError(
      f"truncated or padded payload: {len(data)} data bytes, the header says {want}"
    )
  if _sha(data) != header["data_sha256"]:
    raise PayloadError("corrupt payload: the data's SHA-256 does not match the header's")
  return header, data


def decode(
  payload: bytes, receiver, *, sender=None, prefix: list[list[int]] | None = None
) -> Capture:
  """The Capture in `payload`, checked against the receiver (architecture and tokenizer), the
  expected sender (a Model, or its `fingerprint()["sender"]`), and the expected prefix token
  ids per row when given. Whatever is wrong with a payload is a PayloadError (a header that
  parses as JSON but lacks a field, or holds one of the wrong type or shape, included)."""
  header, data = read_header(payload)
  try:
    return _capture(header, data, receiver, sender, prefix)
  except PayloadError:
    raise
  except DroidSpeakError as err:
    raise PayloadError(f"the payload's plan cannot be used: {err}") from None
  except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError) as err:
    raise PayloadError(f"corrupt payload header ({type(err).__name__}: {err})") from None


def _capture(header: dict, data: bytes, receiver, sender, prefix) -> Capture:
  """decode's checks and arrays, on a header of any content (decode maps its errors)."""
  if not isinstance(header, dict):
    raise PayloadError(f"corrupt payload header: a JSON {type(header).__name__}, not an object")
  fp, mine = header["fingerprint"], fingerprint(receiver, params=False)
  for key, what in (("architecture", "architecture"), ("tokenizer", "tokenizer")):
    if fp.get(key) != mine[key]:
      raise PayloadError(
        f"the payload was made by a model with another {what} than the "
        f"receiver's ({key} fingerprint {str(fp.get(key))[:12]}... vs "
        f"{mine[key][:12]}...)"
      )
  if sender is not None:
    want = sender if isinstance(sender, str) else fingerprint(sender)["sender"]
    if fp.get("sender") != want:
      raise PayloadError(
        f"the payload comes from another sender than the expected one "
        f"(params fingerprint {str(fp.get('sender'))[:12]}... vs {want[:12]}...)"
      )
  rows = header["prefix"]
  if prefix is not None and [list(map(int, r)) for r in prefix] != rows:
    raise PayloadError(
      f"the payload's prefix ({[len(r) for r in rows]} tokens per row) is not "
      f"the receiver's ({[len(r) for r in prefix]}): they must be the same "
      "token ids"
    )
  plan = Plan.parse(header["plan"], int(header["n_layers"]))
  dtype = np.dtype(jnp.dtype(header["dtype"]))
  arrays = {}
  for t in header["tensors"]:
    raw = data[t["offset"] : t["offset"] + t["nbytes"]]
    if len(raw) != t["nbytes"] or int(np.prod(t["shape"])) * dtype.itemsize != t["nbytes"]:
      raise PayloadError(
        f"corrupt payload: tensor {t['name']} of shape {t['shape']} does not fit "
        f"its {t['nbytes']} bytes"
      )
    arrays[t["name"]] = np.frombuffer(raw, dtype).reshape(t["shape"])
  if set(arrays) != set(TENSORS):
    raise PayloadError(f"corrupt payload: tensors {sorted(arrays)}, expected {list(TENSORS)}")
  P = int(header["padded"])
  n = max(map(len, rows))
  cfg = receiver.cfg
  want = {
    "k": {1: len(rows), 2: cfg.n_kv_heads, 4: cfg.head_dim},
    "v": {1: len(rows), 2: cfg.n_kv_heads, 4: cfg.head_dim},
    "e": {1: len(rows), 3: cfg.d_model},
  }
  for name, dims in want.items():
    a = arrays[name]
    if a.ndim != SLOT_AXIS[name] + 2 or any(a.shape[i] != d for i, d in dims.items()):
      raise PayloadError(
        f"corrupt payload: tensor {name} has shape {list(a.shape)}, which does "
        f"not fit {len(rows)} rows of this receiver"
      )
  slots = {name: a.shape[SLOT_AXIS[name]] for name, a in arrays.items()}
  if n > P or any(s != n for s in slots.values()):
    raise PayloadError(
      f"corrupt payload: tensors of {list(slots.values())} slots for a "
      f"{n}-token prefix padded to {P}"
    )

  def pad(name, a):
    widths = [(0, 0)] * a.ndim
    widths[SLOT_AXIS[name]] = (0, P - n)
    return np.pad(a, widths)

  arrays = {name: pad(name, a) for name, a in arrays.items()}
  return Capture(
    tokens=jnp.asarray(engine.pad(rows, P)),
    lengths=jnp.asarray([len(r) for r in rows], jnp.int32),
    k=jnp.asarray(arrays["k"]),
    v=jnp.asarray(arrays["v"]),
    e=jnp.asarray(arrays["e"]),
    plan=plan,
  )


def write(path: str, payload: bytes) -> None:
  with open(path, "wb") as f:
    f.write(payload)


def read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()
