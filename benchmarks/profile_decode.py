"""Where a decode step's time goes: a `jax.profiler` trace of `lm.generate`'s decode loop, each
executed op attributed to a part of the step by the optimized HLO's op_name metadata.

    python benchmarks/profile_decode.py --model smollm2-135m-instruct --batches 1,8,32 \
        --contexts 512,2048 [--dtype float32] [--steps 16] [--hlo DIR]

Per cell (batch B, context C): B random prompts of C tokens are prefilled, the decode loop
(`steps.decode_loop`, the one `lm.generate` runs) is compiled and run once, then run again
under `jax.profiler.trace`. Every op event of that run is matched to its instruction in the
compiled module's optimized HLO, whose `op_name` (the JAX name stack and einsum string) says
what it computes:

  weight slices  copies of one layer's params out of the stacked [L, ...] arrays
                 (`lax.scan` over layers: XLA:CPU materialises each dynamic slice)
  projections    q/k/v/o and MLP products ([B, D] x [D, F] ...)
  attention      scores, softmax and values over the cache, and the key-block reads
  cache write    the new token's K/V into the cache
  LM head        the [B, D] x [D, V] product and the logits' finite check
  sampling       argmax / sampling and the loop's bookkeeping
  other          norms, RoPE, residual adds and whatever else

The table gives ms per decode step for each part, its share, and the step's bandwidth bound
(`kvjax.lm.bench.step_bytes` over the copy bandwidth measured in the same run). `--hlo DIR`
also writes each cell's optimized HLO. Writes <out>/profile_decode_<model>_<dtype>_<backend>
.json and .md.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

import jax
import jax.numpy as jnp
from report import describe, write

# (part, pattern over an op's HLO op_name), first match wins; patterns are einsum strings and
# primitive names of the decoder's code (lm/decoder.py, lm/attention.py, lm/steps.py).
PARTS = (
  ("attention", r"closed_call/while/|bkgth|bkgtn|/attend|online|reduce_max|softmax"),
  ("weight slices", r"dynamic_index_in_dim|/while/body/closed_call$"),
  ("LM head", r"\.\.\.d,d?v->\.\.\.v|\.\.\.d,vd->\.\.\.v|is_finite|isfinite"),
  ("projections", r"btd,d|btnh,nhd|btf,fd|bd,d|nd,n|btd,dkh|btd,dnh"),
  ("cache write", r"dynamic_update_slice|scatter"),
  ("sampling", r"argmax|sample|fold_in|random|/cond/|while/cond|compare|eq"),
)
OTHER = "other"


def parse_args(argv=None) -> argparse.Namespace:
  from kvjax.lm.cli.flags import ints_type

  ap = argparse.ArgumentParser(
    prog="python benchmarks/profile_decode.py", description=__doc__.split("\n")[0]
  )
  ap.add_argument("--model", required=True, help="a name, GGUF file or directory lm.load takes")
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--batches", type=ints_type, default="1,8,32")
  ap.add_argument("--contexts", type=ints_type, default="512,2048")
  ap.add_argument("--steps", type=int, default=16, help="decode steps traced per cell")
  ap.add_argument("--hlo", help="directory to write each cell's optimized HLO into")
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  if args.steps < 1:
    ap.error(f"--steps must be >= 1; got {args.steps}")
  return args


def op_names(hlo: str) -> dict[str, str]:
  """Instruction name -> its op_name metadata ('' when it has none), over every computation of
  an optimized HLO module's text."""
  names = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      names[m.group(1)] = op.group(1) if op else ""
  return names


def part_of(op: str, op_name: str) -> str:
  """The part of the step an op belongs to, by its op_name (a product XLA emitted itself,
  with no metadata, is a projection: the attention's and the head's carry theirs)."""
  if not op_name and op.startswith("dot"):
    return "projections"
  for part, pattern in PARTS:
    if re.search(pattern, op_name):
      return part
  return OTHER


def traced_ops(trace_dir: str, module: str) -> tuple[dict[str, float], dict[str, int]]:
  """(total microseconds, runs) per HLO op of `module` (e.g. 'jit_decode_loop') over the
  Perfetto trace in trace_dir: the thunk executor's events, one per op run."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
  totals: dict[str, float] = collections.Counter()
  runs: dict[str, int] = collections.Counter()
  with gzip.open(files[-1]) as f:
    for e in json.load(f)["traceEvents"]:
      args = e.get("args") or {}
      if e.get("ph") == "X" and args.get("hlo_module") == module and "hlo_op" in args:
        totals[args["hlo_op"]] += e["dur"]
        runs[args["hlo_op"]] += 1
  return totals, runs


def leaf_ops(hlo: str) -> dict[str, str]:
  """Instruction name -> result shape, for the instructions a trace counts as work: all but
  control flow (a while or conditional's span contains its body's ops, counted themselves)."""
  ops = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\S+) ", line)
    if m and not re.search(r" (while|conditional|call)\(", line):
      ops[m.group(1)] = m.group(2).split("{")[0]
  return ops


def profile_cell(model, batch: int, context: int, steps_n: int, hlo_dir: str | None) -> dict:
  """The decode loop of `steps_n` greedy steps after B prompts of C tokens, traced: ms per step
  per part, the wall time per step and the top ops."""
  from kvjax.lm import engine, steps
  from kvjax.lm.bench import prompts
  from kvjax.lm.sampling import Sampling

  rows = prompts(batch, context, model.cfg.vocab_size, seed=0).tolist()

  def run():
    logits, cache, _, _ = engine.prefill(model, rows, steps_n)
    args = (cache, logits, jax.random.key(0), jnp.int32(steps_n), jnp.full((1,), -1, jnp.int32))
    static = dict(sampling=Sampling(), max_steps=steps_n)
    _, seconds, _ = steps.timed(model, steps.decode_loop, *args, **static)
    return seconds

  run()  # compiles
  trace_dir = tempfile.mkdtemp(prefix="kvjax-profile-")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    wall = run()
  # the most recently used decode loop: this cell's (EXECUTABLES is kept in LRU order)
  exe = [e for (key, _), e in steps.EXECUTABLES.items() if key[0] is steps.decode_loop][-1]
  hlo = exe.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"decode_b{batch}_c{context}.hlo.txt"), "w") as f:
      f.write(hlo)
  names, leaves = op_names(hlo), leaf_ops(hlo)
  parts: dict[str, float] = collections.Counter()
  top = []
  totals, runs = traced_ops(trace_dir, "jit_decode_loop")
  n_ops = 0
  for op, us in totals.items():
    if op not in names or op not in leaves:
      continue
    n_ops += runs[op]
    part = part_of(op, names[op])
    parts[part] += us / 1e3 / steps_n
    top.append((us / 1e3 / steps_n, op, part, leaves[op], names[op][-70:]))
  top.sort(reverse=True)
  return dict(
    batch=batch,
    context=context,
    wall_ms=wall / steps_n * 1e3,
    ops_per_step=n_ops / steps_n,
    parts={p: round(ms, 3) for p, ms in sorted(parts.items(), key=lambda x: -x[1])},
    top=[
      dict(ms=round(ms, 3), op=op, part=p, shape=sh, op_name=n) for ms, op, p, sh, n in top[:12]
    ],
  )


def markdown(report: dict) -> str:
  parts = [p for p, _ in PARTS] + [OTHER]
  lines = [
    f"# decode step profile: {report['model']} ({report['dtype']}, {report['backend']})",
    "",
    f"{report['machine']}; copy bandwidth {report['bandwidth_gbs']:.1f} GB/s; "
    f"`python benchmarks/profile_decode.py {report['argv']}`",
    "",
    "ms per decode step, by part (the trace's op times; `wall` is the loop's own time per step)",
    "",
    "| batch | context | wall ms | bound ms | ops run | " + " | ".join(parts) + " |",
    "|---:|---:|---:|---:|---:|" + "---:|" * len(parts),
  ]
  for c in report["cells"]:
    row = [f"{c['parts'].get(p, 0.0):.1f}" for p in parts]
    lines.append(
      f"| {c['batch']} | {c['context']} | {c['wall_ms']:.1f} | {c['bound_ms']:.1f} | "
      f"{c['ops_per_step']:.0f} | " + " | ".join(row) + " |"
    )
  for c in report["cells"]:
    lines += ["", f"top ops, batch {c['batch']} context {c['context']}:", ""]
    lines += [
      f"- {t['ms']:.2f} ms `{t['op']}` {t['shape']} ({t['part']}): `{t['op_name']}`"
      for t in c["top"]
    ]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  from kvjax import lm
  from kvjax.lm import bench

  args = parse_args(argv)
  model = lm.load(args.model, dtype=args.dtype)
  bw = bench.bandwidth()["copy"]
  cells = []
  for batch in args.batches:
    for context in args.contexts:
      print(f"profiling batch {batch} context {context}", file=sys.stderr)
      cell = profile_cell(model, batch, context, args.steps, args.hlo)
      nbytes = bench.step_bytes(model, batch, context + args.steps / 2)["total"]
      cell["bound_ms"] = nbytes / (bw * 1e9) * 1e3
      cells.append(cell)
  name = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
  report = dict(
    model=name,
    dtype=args.dtype,
    backend=jax.default_backend(),
    machine=describe(),
    bandwidth_gbs=bw,
    argv=" ".join(sys.argv[1:] if argv is None else argv),
    cells=cells,
  )
  stem = f"profile_decode_{name}_{args.dtype}"
  write(args.out, stem, report, markdown(report))
  return report


if __name__ == "__main__":
  main()
