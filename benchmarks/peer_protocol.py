"""How benchmarks/decode.py talks to a peer that runs in its own virtual environment.

The peer is a worker process (`peer_llamacpp.py serve`, `peer_gemma.py serve`) started with
that environment's python. It writes one JSON line {"ready": true, "info": {...}} once loaded,
then answers each request line {"kind": "decode" | "prefill", "ids": [[...]], "new_tokens": N}
with {"seconds": s} (seconds per decode step, or of the prefill, as `kvjax.lm.bench` times
them) or {"error": "..."}. Only the standard library: the workers import this file too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import traceback
from collections.abc import Callable


class ProcessPeer:
  """A `kvjax.lm.bench.run` peer: fn(kind, ids [B, T], new_tokens) -> seconds, answered by a
  worker process. `info` is what the worker reported when it was ready."""

  def __init__(self, argv: list[str], name: str):
    self.name = name
    self.proc = subprocess.Popen(
      argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    self.info = self._read()["info"]

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      code = self.proc.wait()
      raise RuntimeError(
        f"the {self.name} peer exited (status {code}) before answering; its error is above"
      )
    msg = json.loads(line)
    if "error" in msg:
      raise RuntimeError(f"the {self.name} peer failed: {msg['error']}")
    return msg

  def __call__(self, kind: str, ids, new_tokens: int) -> float:
    self.proc.stdin.write(
      json.dumps(dict(kind=kind, ids=ids.tolist(), new_tokens=new_tokens)) + "\n"
    )
    return float(self._read()["seconds"])

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)


def serve(info: dict, decode: Callable, prefill: Callable) -> None:
  """The worker's loop on stdin/stdout: decode(ids, new_tokens) and prefill(ids) -> seconds,
  ids a list of rows of token ids. Anything else printed goes to stderr."""
  out, sys.stdout = sys.stdout, sys.stderr
  out.write(json.dumps(dict(ready=True, info=info)) + "\n")
  out.flush()
  for line in sys.stdin:
    req = json.loads(line)
    try:
      if req["kind"] == "decode":
        seconds = decode(req["ids"], req["new_tokens"])
      elif req["kind"] == "prefill":
        seconds = prefill(req["ids"])
      else:
        raise ValueError(f"unknown request kind {req['kind']!r}")
      msg = dict(seconds=seconds)
    except Exception as err:  # reported to the caller, which raises it
      traceback.print_exc()
      msg = dict(error=f"{type(err).__name__}: {err}")
    out.write(json.dumps(msg) + "\n")
    out.flush()
