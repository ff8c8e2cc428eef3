"""Everything a GPU or TPU machine should verify, in one run: `bash benchmarks/device_check.sh`.

1. Each Pallas kernel (sink attention, tree attention) compiled for the device against its XLA
   reference on the same inputs (decode and chunk shapes, a long odd-sized cache, bfloat16),
   and timed against it (median of --repeats, compilation excluded).
2. The prefill attention dispatch (`kvjax.lm.attention.causal`: cuDNN on GPU, the Pallas TPU
   flash kernel on TPU) against the blocked XLA path.
3. The decode grid of `kvjax bench` (batch x context, prefill lengths) on a random model of the
   shape given by --config, against the device's measured memory bandwidth.

Writes <out>/device_<backend>.json and .md. On a CPU it runs the kernels in interpret mode
(correctness only: interpreted kernels are not timed against XLA) with --quick sizes, as a
smoke test of this script.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import attention, bench
from kvjax.lm import model as lm_model
from kvjax.lm.hf_config import from_hf
from kvjax.pallas_kernels import sink_attention as sink
from kvjax.pallas_kernels import tree_attention as tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import CONFIGS
from report import describe, write

MODELS = ("10m", "1b")  # the random models of the decode grid: decode.py's CONFIGS


def timed(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def compare(name: str, run, shape: dict, dtype, repeats: int, on_device: bool) -> dict:
  """run(impl, **extra) -> (o, lse); the Pallas result against the XLA one, both timed."""
  kw = {} if on_device else dict(interpret=True)
  want = jax.jit(functools.partial(run, impl="xla"))
  got = jax.jit(functools.partial(run, impl="pallas", **kw))
  (wo, wl), (go, gl) = want(), got()
  tol = 2e-5 if dtype == jnp.float32 else 3e-2
  err = float(max(jnp.max(jnp.abs(go - wo)), jnp.max(jnp.abs(gl - wl))))
  row = dict(
    kernel=name, **shape, dtype=jnp.dtype(dtype).name, max_abs_err=err, ok=bool(err <= tol)
  )
  if on_device:
    row.update(pallas_ms=timed(got, repeats) * 1e3, xla_ms=timed(want, repeats) * 1e3)
    row["speedup"] = row["xla_ms"] / row["pallas_ms"]
  return row


def kernel_rows(quick: bool, repeats: int, on_device: bool) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  S_long = 1029 if quick else 8197
  for dtype in (jnp.float32, jnp.bfloat16):
    for B, T, N, K, H, S in (
      (8, 1, 32, 8, 128, 1024),
      (1, 1, 16, 8, 128, S_long),
      (4, 16, 32, 8, 64, 2048),
    ):
      if quick:
        B, N, S = min(B, 2), min(N, 16), min(S, S_long)
      q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
      k = jnp.asarray(rng.standard_normal((B, K, S, H)), dtype)
      v = jnp.asarray(rng.standard_normal((B, K, S, H)), dtype)
      shape = dict(B=B, T=T, N=N, K=K, H=H, S=S)
      n_sink = 4
      count = jnp.full((B,), S + 100, jnp.int32)  # a full, wrapped ring
      start = count - (S - n_sink)
      freq = jnp.asarray(1.0 / 10000.0 ** (np.arange(0, H, 2, dtype=np.float32) / H))
      run = functools.partial(
        sink.sink_attention, q, k, v, count, start, n_sink=n_sink, freq=freq, scale=H**-0.5
      )
      rows.append(compare("sink_attention", run, shape, dtype, repeats, on_device))
      length = jnp.asarray(rng.integers(S // 2, S + 1, B), jnp.int32)
      pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
      q_pos = length[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
      kn = jnp.asarray(rng.standard_normal((B, K, T, H)), dtype)
      run = functools.partial(
        tree.tree_attention, q, k, v, length, kn, kn, q_pos, pos, mask, scale=H**-0.5
      )
      rows.append(compare("tree_attention", run, shape, dtype, repeats, on_device))
  return rows


def causal_rows(quick: bool, repeats: int) -> list[dict]:
  rng = np.random.default_rng(1)
  shape = dict(B=1, T=256, N=8, K=2, H=64) if quick else dict(B=1, T=4096, N=32, K=8, H=128)
  B, T, N, K, H = shape.values()
  dtype = jnp.bfloat16
  q = jnp.asarray(rng.standard_normal((B, T, N, H)), dtype)
  k = jnp.asarray(rng.standard_normal((B, K, T, H)), dtype)
  v = jnp.asarray(rng.standard_normal((B, K, T, H)), dtype)
  xla = jax.jit(lambda: attention.causal(q, k, v, scale=H**-0.5, impl="xla"))
  best = jax.jit(lambda: attention.causal(q, k, v, scale=H**-0.5))
  err = float(jnp.max(jnp.abs(best().astype(jnp.float32) - xla().astype(jnp.float32))))
  row = dict(
    kernel="causal prefill",
    **shape,
    dtype="bfloat16",
    impl={"gpu": "cudnn", "tpu": "tpu_flash"}.get(jax.default_backend(), "xla"),
    max_abs_err=err,
    ok=bool(err <= 3e-2),
  )
  row.update(dispatch_ms=timed(best, repeats) * 1e3, xla_ms=timed(xla, repeats) * 1e3)
  return [row]


def markdown(report: dict) -> str:
  lines = [
    f"# device check ({report['machine']})",
    "",
    "| kernel | B | T | N | K | H | S | dtype | max abs err | ok | Pallas ms | XLA ms | speedup |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |",
  ]
  for r in report["kernels"]:
    t = (
      f"{r['pallas_ms']:.3f} | {r['xla_ms']:.3f} | {r['speedup']:.2f}"
      if "pallas_ms" in r
      else "(interpreted) | | "
    )
    lines.append(
      f"| {r['kernel']} | {r['B']} | {r['T']} | {r['N']} | {r['K']} | {r['H']} | "
      f"{r['S']} | {r['dtype']} | {r['max_abs_err']:.2e} | {r['ok']} | {t} |"
    )
  for r in report["causal"]:
    lines += [
      "",
      f"Prefill attention dispatch ({r['impl']}), B={r['B']} T={r['T']} N={r['N']} "
      f"K={r['K']} H={r['H']} bfloat16: {r['dispatch_ms']:.2f} ms vs blocked XLA "
      f"{r['xla_ms']:.2f} ms, max abs err {r['max_abs_err']:.2e} (ok: {r['ok']}).",
    ]
  lines += [
    "",
    f"Decode grid, random {report['config']} model:",
    "",
    bench.markdown(report["bench"]),
  ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/device_check.py", description=__doc__.split("\n")[0]
  )
  ap.add_argument(
    "--config",
    choices=MODELS,
    default=None,
    help="random model of the decode grid (default 1b on a device, 10m on CPU)",
  )
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  ap.add_argument("--batches", default="1,4,8,16")
  ap.add_argument("--contexts", default="256,1024,4096")
  ap.add_argument("--prefill", default="256,1024,4096")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  on_device = jax.default_backend() in ("gpu", "tpu")
  config = args.config or ("1b" if on_device else "10m")
  print(f"device check on {describe()}", file=sys.stderr)
  kernels = kernel_rows(args.quick, args.repeats, on_device)
  causal = causal_rows(args.quick, args.repeats)
  for r in kernels + causal:
    print(r, file=sys.stderr)
  cfg = from_hf({"model_type": "llama", **CONFIGS[config]})
  model = lm_model.init(cfg, dtype=getattr(jnp, args.dtype))
  grid = bench.Grid(
    batches=bench.parse_ints(args.batches),
    contexts=bench.parse_ints(args.contexts),
    prefill=bench.parse_ints(args.prefill),
    repeats=args.repeats,
  )
  if args.quick:
    grid = bench.Grid(batches=(1, 2), contexts=(64,), prefill=(64,), new_tokens=4, repeats=1)
  report = dict(
    machine=describe(),
    config=config,
    kernels=kernels,
    causal=causal,
    bench=bench.run(model, grid, progress=lambda m: print(m, file=sys.stderr)),
  )
  table = markdown(report)
  print(table)
  stem = write(args.out, "device", report, table)
  print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
  return 0 if all(r["ok"] for r in kernels + causal) else 1


if __name__ == "__main__":
  sys.exit(main())
