"""A decode step's weight products in float32, bfloat16 and qwix int8 on this machine.

    python benchmarks/weight_formats.py [--model smollm2-135m-instruct | --config smollm2-135m] \
        [--batches 1,8,32] [--formats float32,bfloat16,...] [--repeats 10]

A decode step of a small model on a CPU is bound by reading its weights (batch 1) and by skinny
products [B, D] x [D, F] (batch 8-32). This script times one pass of every layer's projections
over an activation x [B, D], in each weight format, on the model's shapes. Per layer, with
kvjax.lm.decoder's weight shapes and einsum strings (T = 1 dropped):

  h = rms(x)                                                      [B, D]
  q = h . q [D, N, H],  k = h . k [D, K, H],  v = h . v [D, K, H]
  a = q * (k + v), each kv head's sum broadcast over its N / K query heads   [B, N, H]
  x = x + a . o [N, H, D];  h = rms(x)
  x = x + (silu(h . gate [D, F]) * (h . up [D, F])) . down [F, D]

a pre-norm residual layer (RMS norms without a scale) whose every product feeds the next, so
XLA can skip none. The layers' weights run in two layouts: `scan`, stacked [L, ...] under
`jax.lax.scan` as kvjax.lm.decoder runs them (XLA:CPU copies each dynamic slice of a stacked
weight before its dot), and `loop`, L separate arrays in a Python loop (one jitted program
either way).

Formats (FORMATS):
  float32          float32 weights and activations, jnp.einsum.
  bfloat16         bfloat16 weights and activations (cast at each product's input),
                   products accumulated in float32 (`preferred_element_type=jnp.float32`); the
                   norms and the residual in float32.
  bfloat16-upcast  the same numbers, each bfloat16 operand cast to float32 before a float32 dot:
                   what kvjax.pallas_kernels.precision.einsum_f32 does on a CPU.
  int8             qwix weight-only int8: `qwix.quantize(w, jnp.int8, channelwise_axes=<the
                   output axes>)` (one float32 scale per output channel and layer), products by
                   `qwix.einsum` with a float32 activation. For a float lhs and a QArray rhs,
                   qwix 0.1.8's dot_general takes its "slow" path: it dequantizes the weight
                   (int8 -> float32, times the scale) and runs a float32 dot (its comment: XLA
                   fuses the dequantization into the matmul); no int8 product is computed.
  int8-act         int8 weights AND int8 activations: each product's input quantized on the fly
                   (`qwix.quantize(x, jnp.int8, channelwise_axes=(0,))`, one scale per row),
                   then `qwix.einsum` of two QArrays: qwix's "fast" path, an
                   integer dot_general accumulated in int32, scaled after.

Which dot each format's compiled program really runs is read from XLA's optimized HLO: every
dot's operand and result types and the fusion it sits in (e.g. `__ynn_fusion`, XLA:CPU's
YNNPACK path; `unfused` for a dot thunk of its own), reported per row as `dots`. That answers
whether XLA:CPU multiplies bfloat16 (or int8) natively here or converts to a wider type first.
The report records the CPU's flags relevant to bfloat16 and int8 (avx512_bf16, amx_bf16,
avx512_vnni, amx_int8, ...: `cpu_flags`) and XLA_FLAGS.

Timing: per batch and layout, every format compiled and run once (warm-up), then --repeats
rounds with the formats interleaved; median ms per pass. Per row: weight_bytes (every array
the pass reads, int8 scales included), gbs (weight bytes / time), speedup_vs_f32 (float32's
time in the same layout / this time), rel_err (max |out - float32 out| / max |float32 out|,
the float32 `scan` row of the same batch as reference), product_err and dots; a format XLA
cannot compile or run here gets `error` (its message) instead. The copy and read bandwidth of
`kvjax.lm.bench.bandwidth()` measured in the same run gives the scale.

product_err is the format's own error, free of the chain: through the random layers of
--config an error compounds from layer to layer (without the residual, 30 such layers turn a
bfloat16 rounding into an O(1) difference), while the residual dilutes it in rel_err. So
`product_errors` runs the float32 pass once more and computes each of its products also in
the format, from the same float32 input: the worst max |y - y32| / max |y32| over every layer
and projection.

Weights: --model's own (anything `kvjax.lm.load` takes, loaded in float32: int8's error is
then that of real weight distributions) or random normal ones (std 0.02) in the shapes of
decode.py's CONFIGS[--config]. Writes <out>/weight_formats_<model>_<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from report import describe, write

from kvjax import lm
from kvjax.lm import bench
from kvjax.lm import model as lm_model
from kvjax.lm.cli import positive
from kvjax.lm.cli.flags import ints_type
from kvjax.lm.config import Config
from kvjax.lm.hf_config import from_hf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import CONFIGS

FORMATS = {
  "float32": "float32 weights and activations",
  "bfloat16": "bfloat16 weights and activations, float32 accumulation",
  "bfloat16-upcast": "bfloat16 weights, cast to float32 before a float32 dot",
  "int8": "qwix int8 weights (per output channel), float32 activations",
  "int8-act": "qwix int8 weights and dynamically quantized int8 activations",
}
# how each format stores its weights (formats that share a kind share the arrays)
STORED = {
  "float32": "float32",
  "bfloat16": "bfloat16",
  "bfloat16-upcast": "bfloat16",
  "int8": "int8",
  "int8-act": "int8",
}
LAYOUTS = ("scan", "loop")
# name: (einsum of one product, the weight's output axes); an activation's first axis is B
PROJECTIONS = {
  "q": ("bd,dnh->bnh", (1, 2)),
  "k": ("bd,dkh->bkh", (1, 2)),
  "v": ("bd,dkh->bkh", (1, 2)),
  "o": ("bnh,nhd->bd", (2,)),
  "gate": ("bd,df->bf", (1,)),
  "up": ("bd,df->bf", (1,)),
  "down": ("bf,fd->bd", (1,)),
}
# CPU flags that say what bfloat16 and int8 products this CPU has instructions for
CPU_FLAGS = (
  "avx2",
  "avx512f",
  "avx512_bf16",
  "avx512_fp16",
  "avx512_vnni",
  "avx_vnni",
  "amx_tile",
  "amx_bf16",
  "amx_int8",
)
STD = 0.02  # random weights' standard deviation (the decoder's init_param)


def cpu_flags() -> dict[str, bool] | None:
  """{flag: present} for CPU_FLAGS, from /proc/cpuinfo (None where there is none)."""
  if not os.path.exists("/proc/cpuinfo"):
    return None
  with open("/proc/cpuinfo") as f:
    line = next((ln for ln in f if ln.startswith("flags")), "")
  have = set(line.split(":", 1)[-1].split())
  return {flag: flag in have for flag in CPU_FLAGS}


def shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
  """Each projection's weight shape for one layer, the decoder's: q [D, N, H], k and v
  [D, K, H], o [N, H, D], gate and up [D, F], down [F, D]."""
  D, N, K, H, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  return dict(
    q=(D, N, H), k=(D, K, H), v=(D, K, H), o=(N, H, D), gate=(D, F), up=(D, F), down=(F, D)
  )


def random_weights(cfg: Config, seed: int) -> dict[str, np.ndarray]:
  """{projection: float32 [L, ...]} of normal entries with std STD, in `shapes(cfg)`."""
  rng = np.random.default_rng(seed)
  return {
    name: (STD * rng.standard_normal((cfg.n_layers, *shape))).astype(np.float32)
    for name, shape in shapes(cfg).items()
  }


def model_weights(model: lm.Model, label: str) -> dict[str, np.ndarray]:
  """The projections {name: float32 [L, ...]} of model (`label`: its name in errors);
  ValueError for a model whose MLP is not one dense gate/up/down product per layer (mixture of
  experts)."""
  if model.cfg.n_experts:
    raise ValueError(
      f"{label} is a mixture-of-experts model ({model.cfg.n_experts} experts): its MLP is not "
      "one dense [D, F] product per layer; pick a dense model or a --config"
    )
  blocks = model.params()["blocks"]
  parts = {**blocks["attn"], **blocks["mlp"]}
  out = {name: np.asarray(parts[name], np.float32) for name in PROJECTIONS}
  want = {k: (model.cfg.n_layers, *s) for k, s in shapes(model.cfg).items()}
  got = {k: w.shape for k, w in out.items()}
  if got != want:
    raise ValueError(f"{label}: projection shapes {got}, expected {want}")
  return out


@functools.partial(jax.jit, static_argnums=1)
def quantized(w: jax.Array, axes: tuple[int, ...]) -> qwix.QArray:
  """w in qwix int8 with a float32 scale per index of `axes` (absmax over the others)."""
  return qwix.quantize(w, jnp.int8, channelwise_axes=axes)


def stored(kind: str, weights: dict[str, np.ndarray]) -> dict:
  """The `scan` layout's weights {name: [L, ...]} stored as `kind` (STORED's values; int8: a
  QArray with a scale per layer and output channel)."""
  if kind == "float32":
    return {name: jnp.asarray(w) for name, w in weights.items()}
  if kind == "bfloat16":
    return {name: jnp.asarray(w, jnp.bfloat16) for name, w in weights.items()}
  axes = {name: (0, *(a + 1 for a in PROJECTIONS[name][1])) for name in weights}
  return {name: quantized(jnp.asarray(w), axes[name]) for name, w in weights.items()}


def per_layer(stacked: dict) -> list[dict]:
  """The `loop` layout of `stored`'s weights: [{name: layer i's [...]}] (copies)."""
  L = stacked["q"].shape[0]
  return [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(L)]


def product(fmt: str, name: str, x: jax.Array, w) -> jax.Array:
  """Projection `name` of activation x [B, ...] (float32) by weight w in format fmt, in
  float32."""
  spec = PROJECTIONS[name][0]
  if fmt == "float32":
    return jnp.einsum(spec, x, w)
  if fmt == "bfloat16":
    return jnp.einsum(spec, x.astype(jnp.bfloat16), w, preferred_element_type=jnp.float32)
  if fmt == "bfloat16-upcast":
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)  # the activation bfloat16 would multiply
    return jnp.einsum(spec, xb, w.astype(jnp.float32))
  if fmt == "int8":
    return qwix.einsum(spec, x, w)
  qx = qwix.quantize(x, jnp.int8, channelwise_axes=(0,))  # a scale per row
  return qwix.einsum(spec, qx, w, preferred_element_type=jnp.float32)


def rms(x: jax.Array) -> jax.Array:
  """x over its root mean square on the last axis (an RMS norm without a scale)."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


def layer(prod, x: jax.Array, w: dict) -> jax.Array:
  """One layer of the pass (the module docstring's), x [B, D] -> [B, D]; prod(name, h, w[name])
  computes each projection."""
  B = x.shape[0]
  h = rms(x)
  q, k, v = (prod(n, h, w[n]) for n in ("q", "k", "v"))  # [B, N, H], [B, K, H] x2
  K = k.shape[1]
  a = q.reshape(B, K, -1, q.shape[-1]) * (k + v)[:, :, None]  # [B, K, N / K, H]
  x = x + prod("o", a.reshape(q.shape), w["o"])
  h = rms(x)
  g, u = prod("gate", h, w["gate"]), prod("up", h, w["up"])
  return x + prod("down", jax.nn.silu(g) * u, w["down"])


def projections(fmt: str, layout: str):
  """The jitted pass (weights, x [B, D] float32) -> [B, D] float32 over every layer."""
  prod = functools.partial(product, fmt)

  def scan(weights, x):
    return jax.lax.scan(lambda x, w: (layer(prod, x, w), None), x, weights)[0]

  def loop(weights, x):
    for w in weights:
      x = layer(prod, x, w)
    return x

  return jax.jit(scan if layout == "scan" else loop)


@functools.partial(jax.jit, static_argnums=0)
def product_errors(formats: tuple[str, ...], weights: dict, x: jax.Array) -> jax.Array:
  """[len(formats), L, 7]: max |y - y32| / max |y32| of every layer's products in the float32
  pass over x [B, D], y32 that product, y the same product of the same input in a format
  (weights: {kind: its `scan` layout weights}, float32's among them)."""

  def body(x, ws):
    errs = []

    def prod(name, h, w):
      want = product("float32", name, h, w)
      for fmt in formats:
        got = product(fmt, name, h, ws[STORED[fmt]][name])
        errs.append(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
      return want

    y = layer(prod, x, ws["float32"])
    return y, jnp.stack(errs).reshape(len(PROJECTIONS), len(formats)).T

  return jax.lax.scan(body, x, weights)[1].transpose(1, 0, 2)


def dot_kinds(hlo: str) -> list[str]:
  """The distinct dots of an optimized HLO module's text, each as '<lhs> x <rhs> -> <result>
  in <fusion kind>' (element types; `unfused` for a dot outside any fusion), sorted."""
  fusion_of, kinds = {}, set()
  for line in hlo.splitlines():  # the fusion kind of each fused computation
    m = re.search(r" fusion\(.*kind=(\w+), calls=%?([\w.-]+)", line)
    if m:
      custom = re.search(r'"fusion_config":\{"kind":"(\w+)"', line)
      fusion_of[m.group(2)] = custom.group(1) if custom else m.group(1)
  types, computation = {}, None
  for line in hlo.splitlines():
    head = re.match(r"(?:ENTRY )?%?([\w.-]+) \(.*\{$", line)
    if head:
      computation, types = head.group(1), {}
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.-]+) = (\w+)\[", line)
    if not m:
      continue
    types[m.group(1)] = m.group(2)
    dot = re.search(r" dot\(%?([\w.-]+), %?([\w.-]+)\)", line)
    if dot:
      lhs, rhs = (types.get(n, "?") for n in dot.groups())
      where = fusion_of.get(computation, "unfused")
      kinds.add(f"{lhs} x {rhs} -> {m.group(2)} in {where}")
  return sorted(kinds)


def weight_bytes(weights) -> int:
  """Bytes of every array in a format's weights (int8's qvalues and scales)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(weights)))


def compiled(fmt: str, layout: str, weights, x: jax.Array) -> tuple[object, dict]:
  """(the compiled pass, {dots}), or (None, {error}) when XLA cannot compile or run it."""
  try:
    exe = projections(fmt, layout).lower(weights, x).compile()
    jax.block_until_ready(exe(weights, x))  # the warm-up run
  except jax.errors.JaxRuntimeError as err:  # e.g. UNIMPLEMENTED for a dot of these types
    return None, dict(error=f"{type(err).__name__}: {str(err).splitlines()[0][:300]}")
  return exe, dict(dots=dot_kinds(exe.as_text()))


def measure(weights: dict, x: jax.Array, layout: str, formats, repeats: int) -> list[dict]:
  """One row per format of the pass over x [B, D] in `layout` (weights: {kind: its weights in
  that layout}), the module docstring's fields but those `compare` adds: warm-up, then
  `repeats` rounds with the formats interleaved."""
  rows, runs = [], {}
  for fmt in formats:
    w = weights[STORED[fmt]]
    exe, row = compiled(fmt, layout, w, x)
    rows.append(
      dict(format=fmt, layout=layout, batch=x.shape[0], weight_bytes=weight_bytes(w), **row)
    )
    if exe is not None:
      runs[fmt] = (exe, w, [])
  for _ in range(repeats):
    for exe, w, ms in runs.values():
      t0 = time.perf_counter()
      jax.block_until_ready(exe(w, x))
      ms.append((time.perf_counter() - t0) * 1e3)
  for row in rows:
    if row["format"] in runs:
      exe, w, ms = runs[row["format"]]
      row.update(ms=statistics.median(ms), runs_ms=ms, out=np.asarray(exe(w, x), np.float32))
      row["gbs"] = row["weight_bytes"] / (row["ms"] * 1e6)
  return rows


def compare(rows: list[dict], scan: dict, x: jax.Array) -> list[dict]:
  """Adds to one batch's rows (`measure`'s, both layouts) speedup_vs_f32, rel_err (against the
  float32 `scan` row's output, which it drops from every row) and product_err (the worst of
  `product_errors`; scan: {kind: weights} in the scan layout)."""
  ref = next(r for r in rows if r["format"] == "float32" and r["layout"] == "scan")
  scale = float(np.max(np.abs(ref["out"])))
  ran = tuple(dict.fromkeys(r["format"] for r in rows if "ms" in r))
  worst = dict(zip(ran, np.max(np.asarray(product_errors(ran, scan, x)), axis=(1, 2)).tolist()))
  for r in rows:
    if "ms" not in r:
      continue
    base = next(b for b in rows if b["format"] == "float32" and b["layout"] == r["layout"])
    r["speedup_vs_f32"] = base["ms"] / r["ms"]
    r["rel_err"] = float(np.max(np.abs(r["out"] - ref["out"]))) / scale
    r["product_err"] = worst[r["format"]]
  for r in rows:
    r.pop("out", None)
  return rows


def markdown(report: dict) -> str:
  m = report["model"]
  flags = report["cpu_flags"] or {}
  bw = report["bandwidth_gbs"]
  lines = [
    f"# weight formats: {m['name']} ({m['weights']} weights; {report['backend']})",
    "",
    f"{report['machine']}; copy bandwidth {bw['copy']:.1f} GB/s, read {bw['read']:.1f} GB/s; "
    f"`python benchmarks/weight_formats.py {report['argv']}`",
    "",
    "CPU flags: "
    + (", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items()) or "unknown")
    + f"; XLA_FLAGS {report['xla_flags'] or '(none)'}",
    "",
    "One pass of every layer's q, k, v, o, gate, up, down products over x [B, D] "
    f"(L {m['L']}, D {m['D']}, N {m['N']}, K {m['K']}, H {m['H']}, F {m['F']}); median of "
    f"{report['repeats']}; rel err: max |out - float32 out| / max |float32 out|.",
    "",
    "| batch | layout | format | ms | weight MB | GB/s | vs float32 | rel err | product err "
    "| dots |",
    "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
  ]
  for r in report["rows"]:
    head = f"| {r['batch']} | {r['layout']} | {r['format']} |"
    if "error" in r:
      lines.append(f"{head} | {r['weight_bytes'] / 1e6:.1f} | | | | | {r['error']} |")
      continue
    lines.append(
      f"{head} {r['ms']:.3f} | {r['weight_bytes'] / 1e6:.1f} | {r['gbs']:.1f} | "
      f"{r['speedup_vs_f32']:.2f}x | {r['rel_err']:.1e} | {r['product_err']:.1e} | "
      f"{'; '.join(r['dots'])} |"
    )
  return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/weight_formats.py", description=__doc__.split("\n")[0]
  )
  which = ap.add_mutually_exclusive_group()
  which.add_argument(
    "--model",
    help="a real model's weights, anything kvjax.lm.load takes (default: smollm2-135m-instruct)",
  )
  which.add_argument(
    "--config",
    choices=sorted(CONFIGS),
    help="random weights in the shapes of decode.py's config (smollm2-135m: SmolLM2-135M-"
    "Instruct's)",
  )
  ap.add_argument("--batches", type=ints_type, default="1,8,32", help="batch sizes B of x [B, D]")
  ap.add_argument("--formats", default=",".join(FORMATS), help=f"some of {','.join(FORMATS)}")
  ap.add_argument("--repeats", type=positive, default=10, help="timed rounds (median)")
  ap.add_argument("--seed", type=int, default=0, help="seed of x and of random weights")
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  args.formats = tuple(dict.fromkeys(f for f in args.formats.split(",") if f))
  if set(args.formats) - set(FORMATS) or "float32" not in args.formats:
    ap.error(
      f"--formats takes float32 (the reference) and any of {','.join(FORMATS)}; "
      f"got {','.join(args.formats)!r}"
    )
  if args.model is None and args.config is None:
    args.model = "smollm2-135m-instruct"
  if args.model is not None:
    try:
      lm_model.find(args.model)
    except FileNotFoundError as err:
      ap.error(f"--model: {err}")
  return args


def weights_of(args: argparse.Namespace) -> tuple[dict[str, np.ndarray], dict]:
  """(the projections {name: float32 [L, ...]}, the report's model entry): --model's own
  weights, or random ones in the shapes of CONFIGS[--config]."""
  if args.model is not None:
    model = lm.load(args.model, dtype=jnp.float32)
    cfg, weights = model.cfg, model_weights(model, args.model)
    name = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
    entry = dict(name=name, weights="real", path=model.path)
  else:
    cfg = from_hf({"model_type": "llama", **CONFIGS[args.config]})
    weights, entry = random_weights(cfg, args.seed), dict(name=args.config, weights="random")
  entry.update(
    L=cfg.n_layers, D=cfg.d_model, N=cfg.n_heads, K=cfg.n_kv_heads, H=cfg.head_dim, F=cfg.ffn_dim
  )
  return weights, entry


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    weights, entry = weights_of(args)
  except ValueError as err:  # a model without dense projections
    sys.exit(f"python benchmarks/weight_formats.py: error: --model: {err}")
  bandwidth = bench.bandwidth()
  scan = {kind: stored(kind, weights) for kind in sorted({STORED[f] for f in args.formats})}
  laid_out = dict(scan=scan, loop={kind: per_layer(w) for kind, w in scan.items()})
  rows = []
  for batch in args.batches:
    rng = np.random.default_rng(args.seed + batch)
    x = jnp.asarray(rng.standard_normal((batch, entry["D"])), jnp.float32)
    cell = []
    for layout in LAYOUTS:
      print(f"batch {batch}, {layout}: {', '.join(args.formats)}", file=sys.stderr)
      cell += measure(laid_out[layout], x, layout, args.formats, args.repeats)
    rows += compare(cell, scan, x)
  report = dict(
    model=entry,
    backend=jax.default_backend(),
    machine=describe(),
    cpu_flags=cpu_flags(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    versions=dict(jax=jax.__version__, qwix=qwix.__version__),
    bandwidth_gbs=bandwidth,
    argv=" ".join(sys.argv[1:] if argv is None else argv),
    repeats=args.repeats,
    formats=FORMATS,
    rows=rows,
  )
  table = markdown(report)
  print(table)
  write(args.out, f"weight_formats_{entry['name']}", report, table)
  return report


if __name__ == "__main__":
  main()
