"""llama.cpp as a peer of benchmarks/decode.py, in its own virtual environment.

    python peer_llamacpp.py convert --hf DIR --converter LLAMA_CPP/convert_hf_to_gguf.py \
        --out model.gguf --outtype f32
    python peer_llamacpp.py quantize --gguf model.Q4_1.gguf --out model.F32.gguf --ftype f32
    python peer_llamacpp.py serve --gguf model.gguf --threads 2 --kv-type f32

`convert` runs llama.cpp's own converter on the HF checkpoint. A checkpoint whose tokenizer
llama.cpp does not know by hash (the benchmark's is kvjax's Shakespeare BPE) gets the plain
byte-level "gpt-2" pre-tokenizer: the benchmark feeds token ids, never text, so the choice does
not change what is timed.

`quantize` rewrites a GGUF file in another file type with llama.cpp's own quantizer
(`llama_model_quantize`, its default parameters but the file type, with allow_requantize so
that a quantized file may be dequantized): `--ftype f32` makes the F32 copy of a shipped
quantized file that benchmarks/decode.py --model times beside the file itself.

`serve` answers peer_protocol requests with llama.cpp's C API through llama-cpp-python
(`llama_decode` on a `llama_batch`, as llama.cpp's batched-bench does):
  prefill (one prompt of P tokens): one `llama_decode` of the P tokens (n_batch >= P, n_ubatch
      512) with the last position's logits, and its argmax.
  decode (B prompts of C tokens, N steps): each row prefilled into its own sequence (not
      timed), then N steps of one `llama_decode` of B tokens (one per sequence) + a greedy
      argmax per row, timed together, over N.
A context (KV cells for B x (C + N) tokens, K/V of --kv-type) is made for each request whose
shape differs from the last one's (untimed), else the last one's memory is cleared.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import runpy
import sys
import time

KV_TYPES = {"f32": 0, "f16": 1}  # ggml_type
# ctypes callbacks handed to llama.cpp, kept alive here
CALLBACKS = []
FTYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama_ftype: LLAMA_FTYPE_ALL_F32, _MOSTLY_F16, _BF16


def convert(args: argparse.Namespace) -> None:
  src = os.path.dirname(os.path.abspath(args.converter))
  sys.path[:0] = [src, os.path.join(src, "gguf-py")]
  from conversion import base  # llama.cpp's converter package, next to the script

  known = base.TextModel.get_vocab_base_pre

  def pre_tokenizer(self, tokenizer) -> str:
    try:
      return known(self, tokenizer)
    except NotImplementedError:
      print(
        "peer_llamacpp: unknown tokenizer hash, using the byte-level 'gpt-2' pre-tokenizer",
        file=sys.stderr,
      )
      return "gpt-2"

  base.TextModel.get_vocab_base_pre = pre_tokenizer
  sys.argv = [args.converter, args.hf, "--outfile", args.out, "--outtype", args.outtype]
  runpy.run_path(args.converter, run_name="__main__")


def quantize(args: argparse.Namespace) -> None:
  import llama_cpp

  logs_off(llama_cpp)
  llama_cpp.llama_backend_init()
  params = llama_cpp.llama_model_quantize_default_params()
  params.ftype, params.allow_requantize, params.nthread = FTYPES[args.ftype], True, args.threads
  status = llama_cpp.llama_model_quantize(
    args.gguf.encode(), args.out.encode(), ctypes.byref(params)
  )
  if status != 0:
    raise SystemExit(
      f"llama_model_quantize({args.gguf} -> {args.out}, {args.ftype}) returned {status}"
    )
  print(f"peer_llamacpp: wrote {args.out} ({args.ftype})", file=sys.stderr)


def logs_off(llama_cpp) -> None:
  """Turns llama.cpp's logs (model load, graphs, per-tensor quantization) off."""
  callback = llama_cpp.llama_log_callback(lambda level, text, data: None)
  llama_cpp.llama_log_set(callback, ctypes.c_void_p())
  CALLBACKS.append(callback)  # llama.cpp calls it for the rest of the process


class Runner:
  """One loaded GGUF model and the context of its last request's shape."""

  def __init__(self, gguf: str, threads: int, kv_type: str, n_batch: int):
    import llama_cpp
    import numpy as np

    self.c, self.np = llama_cpp, np
    logs_off(llama_cpp)
    llama_cpp.llama_backend_init()
    mparams = llama_cpp.llama_model_default_params()
    self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), mparams)
    if not self.model:
      raise RuntimeError(f"llama.cpp could not load {gguf}")
    self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
    self.threads, self.kv_type, self.n_batch = threads, KV_TYPES[kv_type], n_batch
    self.current = None  # ((sequences, cells), context, batch) of the last request

  def context(self, seqs: int, cells: int):
    """A context of `seqs` sequences and at least `cells` KV cells, its memory cleared. Only the
    last one made is kept: the benchmark's interleaved cells change shape at every request,
    and keeping one context per shape held 5 GB of f32 K/V per peer on SmolLM2's grid (batch
    32 x 2,080 cells alone is 3.2 GB). Making one (untimed) takes up to 2 s at that size."""
    key = (seqs, -(-cells // 256) * 256)
    if self.current is None or self.current[0] != key:
      self.close()
      p = self.c.llama_context_default_params()
      p.n_ctx, p.n_seq_max = key[1], seqs
      p.n_batch, p.n_ubatch = self.n_batch, min(512, self.n_batch)
      p.n_threads = p.n_threads_batch = self.threads
      p.type_k = p.type_v = self.kv_type
      p.no_perf = True
      ctx = self.c.llama_init_from_model(self.model, p)
      if not ctx:
        raise RuntimeError(f"llama.cpp could not make a context of {key[1]} cells, {seqs} seqs")
      self.current = (key, ctx, self.c.llama_batch_init(max(self.n_batch, seqs), 0, seqs))
    _, ctx, batch = self.current
    self.c.llama_memory_clear(self.c.llama_get_memory(ctx), True)
    return ctx, batch

  def close(self) -> None:
    """Frees the context kept (if any)."""
    if self.current is not None:
      _, ctx, batch = self.current
      self.c.llama_batch_free(batch)
      self.c.llama_free(ctx)
      self.current = None

  def _decode(self, ctx, batch, entries) -> None:
    """entries: (token, pos, seq, logits?) for one llama_decode."""
    for i, (tok, pos, seq, out) in enumerate(entries):
      batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
      batch.seq_id[i][0], batch.logits[i] = seq, int(out)
    batch.n_tokens = len(entries)
    status = self.c.llama_decode(ctx, batch)
    if status != 0:
      raise RuntimeError(f"llama_decode returned {status}")

  def _argmax(self, ctx, i: int) -> int:
    logits = self.np.ctypeslib.as_array(self.c.llama_get_logits_ith(ctx, i), (self.vocab,))
    return int(logits.argmax())

  def prefill(self, ids) -> float:
    (row,) = ids
    ctx, batch = self.context(1, len(row) + 1)
    t0 = time.perf_counter()
    for start in range(0, len(row), self.n_batch):
      chunk = row[start : start + self.n_batch]
      self._decode(
        ctx, batch, [(t, start + j, 0, start + j == len(row) - 1) for j, t in enumerate(chunk)]
      )
    self._argmax(ctx, -1)
    return time.perf_counter() - t0

  def decode(self, ids, new_tokens: int) -> float:
    n = len(ids[0])
    ctx, batch = self.context(len(ids), len(ids) * (n + new_tokens))
    toks = []
    for s, row in enumerate(ids):  # each row's prompt into its own sequence (not timed)
      for start in range(0, n, self.n_batch):
        self._decode(
          ctx,
          batch,
          [
            (t, start + j, s, start + j == n - 1)
            for j, t in enumerate(row[start : start + self.n_batch])
          ],
        )
      toks.append(self._argmax(ctx, -1))
    t0 = time.perf_counter()
    for step in range(new_tokens):
      self._decode(ctx, batch, [(t, n + step, s, True) for s, t in enumerate(toks)])
      toks = [self._argmax(ctx, s) for s in range(len(toks))]
    return (time.perf_counter() - t0) / new_tokens


def serve(args: argparse.Namespace) -> None:
  import llama_cpp
  from peer_protocol import serve as loop

  runner = Runner(args.gguf, args.threads, args.kv_type, args.n_batch)
  desc = ctypes.create_string_buffer(256)
  llama_cpp.llama_model_desc(runner.model, desc, len(desc))
  info = dict(
    llama_cpp_python=llama_cpp.__version__,
    gguf=os.path.basename(args.gguf),
    model=desc.value.decode(errors="replace"),
    n_params=llama_cpp.llama_model_n_params(runner.model),
    model_bytes=llama_cpp.llama_model_size(runner.model),
    threads=args.threads,
    kv_type=args.kv_type,
    n_batch=args.n_batch,
    system_info=llama_cpp.llama_print_system_info().decode(errors="replace"),
  )
  try:
    loop(info, runner.decode, runner.prefill)
  finally:
    runner.close()


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/peer_llamacpp.py", description=__doc__.split("\n")[0]
  )
  sub = ap.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("convert", help="HF checkpoint -> GGUF with llama.cpp's converter")
  c.add_argument("--hf", required=True)
  c.add_argument("--converter", required=True, help="llama.cpp's convert_hf_to_gguf.py")
  c.add_argument("--out", required=True)
  c.add_argument("--outtype", default="f32", choices=("f32", "f16", "bf16"))
  q = sub.add_parser("quantize", help="GGUF -> GGUF of another file type, llama.cpp's quantizer")
  q.add_argument("--gguf", required=True, help="the GGUF file to rewrite")
  q.add_argument("--out", required=True)
  q.add_argument("--ftype", default="f32", choices=sorted(FTYPES))
  q.add_argument("--threads", type=int, default=os.cpu_count())
  s = sub.add_parser("serve", help="answer timing requests on stdin/stdout")
  s.add_argument("--gguf", required=True)
  s.add_argument("--threads", type=int, default=os.cpu_count())
  s.add_argument("--kv-type", default="f32", choices=sorted(KV_TYPES))
  s.add_argument("--n-batch", type=int, default=4096, help="tokens per llama_decode")
  args = ap.parse_args(argv)
  {"convert": convert, "quantize": quantize, "serve": serve}[args.cmd](args)


if __name__ == "__main__":
  main()
