"""A model's whole decode step with its layers stacked or per layer: what the layout costs.

    python benchmarks/layer_layout.py [--model smollm2-135m-instruct] \
        [--cells 1/512,8/512,32/512,1/2048,8/2048,32/2048] [--steps 16] [--repeats 3]

kvjax's decoder runs its layers as one `lax.scan` over params stacked [L, ...] and reads K/V
from caches stacked [L, B, K, S, H] at the traced layer index, and XLA:CPU materialises each
such dynamic slice before the product that reads it (benchmarks/profile_decode.py: the
weight slices at batch 1, the key-block copies at batch 8-32). The remedy is structural, so
this script measures it before any library change: the same greedy decode step, from the same
prefilled cache, run three ways in one process, rounds interleaved:

  kvjax      `lm.generate`'s decode loop, timed as `kvjax.lm.bench.decode` times it; the library.
  stacked    the step below under `lax.scan` over the stacked params, each layer's whole cache
             read at the traced layer index, the new K/V written after the scan.
  per-layer  the same step in a Python loop over L per-layer param trees and L separate
             [B, K, S, H] cache buffers (donated; each layer writes its new K/V into its own
             buffer, then reads it): no traced layer index anywhere.

The step (both layouts) is the decoder's own modules, `kvjax.lm.decoder.layer_block`'s Block
per layer: attn_norm, attn.qkv, RoPE (`kvjax.lm.rope.apply`), attn.out, the post-norms where
the family has them, mlp_norm and the MLP; the attention is one product over the layer's whole
cache (no key blocks), the new token written first, its scores masked to the filled slots and
the layer's window and soft-capped as the config says; the LM head is `Decoder.logits`.
Tokens: the argmax of each step, the first from the prefill's logits (as lm.generate's greedy
rows); `agree` is the share of the B x steps tokens equal to kvjax's (float32 sums in another
order may flip a near tie).

Per cell (B rows of C random prompt tokens): ms per step of each way (median of --repeats),
its share of the bandwidth bound (`kvjax.lm.bench.step_bytes` at the mean context, over the
copy bandwidth measured in the same run) and its speed over kvjax's. Models whose layers mix
dense and mixture-of-experts MLPs are refused. Writes <out>/layer_layout_<model>_<backend>
.json and .md.
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
from flax import nnx
from report import describe, write

from kvjax import lm
from kvjax.lm import bench, engine, rope
from kvjax.lm import model as lm_model
from kvjax.lm.cli import positive
from kvjax.lm.decoder import Block, layer_block, layer_runs
from kvjax.lm.generate import generate
from kvjax.pallas_kernels.precision import einsum_f32

WAYS = ("kvjax", "stacked", "per-layer")


def attend_layer(q, kc, vc, slot, window, scale, softcap) -> jax.Array:
  """q [B, N, H] (after RoPE) over one layer's whole cache kc, vc [B, K, S, H], whose slots
  [0, slot] hold each row's tokens (slot [B]: the new token's, already written) -> [B, N, H]."""
  B, N, H = q.shape
  K, S = kc.shape[1], kc.shape[2]
  qg = q.reshape(B, K, N // K, H)
  s = einsum_f32("bkgh,bksh->bkgs", qg, kc) * scale  # [B, K, G, S]
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  gap = slot[:, None] - jnp.arange(S)[None, :]  # [B, S]: the query's distance to each slot
  sees = (gap >= 0) & ((window == 0) | (gap < window))
  p = jax.nn.softmax(jnp.where(sees[:, None, None, :], s, -jnp.inf), axis=-1)
  return einsum_f32("bkgs,bksh->bkgh", p, vc).reshape(B, N, H).astype(q.dtype)


def new_kv(blk: Block, x, freq, slot):
  """x [B, 1, D] -> (q [B, N, H], k, v [B, K, H]): the layer's projections of the new token at
  position slot [B], q and k rotated."""
  q, k, v = blk.attn.qkv(blk.attn_norm(x))  # [B, 1, N, H], [B, 1, K, H]
  pos = slot[:, None]
  return rope.apply(q, pos, freq)[:, 0], rope.apply(k, pos, freq)[:, 0], v[:, 0]


def finish_layer(blk: Block, x, a):
  """x [B, 1, D] and its attention a [B, N, H] -> the layer's output [B, 1, D]."""
  y = blk.attn.out(a[:, None])
  if blk.cfg.post_norms:
    y = blk.post_attn_norm(y)
  x = x + y
  m = (blk.moe if hasattr(blk, "moe") else blk.mlp)(blk.mlp_norm(x))
  if blk.cfg.post_norms:
    m = blk.post_mlp_norm(m)
  return x + m


def write_slot(c: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
  """c [B, K, S, H] with new [B, K, H] at each row's slot [B]."""
  return c.at[jnp.arange(c.shape[0]), :, slot].set(new.astype(c.dtype))


def greedy(dec, x_fn, tok, slot, caches, n: int):
  """n greedy steps: tokens [B, n + 1] (the first is tok) and the caches after.
  x_fn(x [B, 1, D], slot, caches) -> (x, caches) runs every layer of one step."""
  B = tok.shape[0]
  out = jnp.zeros((B, n + 1), jnp.int32).at[:, 0].set(tok)

  def step(i, carry):
    tok, slot, caches, out = carry
    x, caches = x_fn(dec.embed_tokens(tok[:, None]), slot, caches)
    tok = jnp.argmax(dec.logits(dec.final_norm(x))[:, 0], axis=-1).astype(jnp.int32)
    return tok, slot + 1, caches, out.at[:, i + 1].set(tok)

  return jax.lax.fori_loop(0, n, step, (tok, slot, caches, out))[3], caches


@functools.partial(jax.jit, static_argnames=("graphdef", "n"), donate_argnames=("k", "v"))
def stacked_decode(graphdef, state, k, v, tok, slot, freqs, windows, *, n: int):
  """n greedy steps with the layers scanned: k, v [L, B, K, S, H]; freqs [L, H/2]; windows [L]."""
  dec = nnx.merge(graphdef, state)
  cfg = dec.cfg
  blocks_def, blocks = nnx.split(dec.blocks)

  def x_fn(x, slot, caches):
    k, v = caches

    def body(x, xs):
      params, freq, window, layer = xs
      blk = nnx.merge(blocks_def, params)
      q, kn, vn = new_kv(blk, x, freq, slot)
      kc, vc = write_slot(k[layer], kn, slot), write_slot(v[layer], vn, slot)
      a = attend_layer(q, kc, vc, slot, window, cfg.query_scale, cfg.attn_softcap)
      return finish_layer(blk, x, a), (kn, vn)

    index = jnp.arange(cfg.n_layers, dtype=jnp.int32)
    x, (ks, vs) = jax.lax.scan(body, x, (blocks, freqs, windows, index))
    rows = jnp.arange(x.shape[0])
    # advanced indices (rows, slot) lead the update: [B, L, K, H]
    k = k.at[:, rows, :, slot].set(ks.transpose(1, 0, 2, 3).astype(k.dtype))
    v = v.at[:, rows, :, slot].set(vs.transpose(1, 0, 2, 3).astype(v.dtype))
    return x, (k, v)

  return greedy(dec, x_fn, tok, slot, (k, v), n)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "block_def", "windows", "n"), donate_argnames=("k", "v")
)
def per_layer_decode(graphdef, state, block_def, layers, k, v, tok, slot, freqs, *, windows, n):
  """n greedy steps with the layers unrolled: layers, k, v, freqs: L per-layer entries (params
  state, [B, K, S, H] buffers, [H/2]); windows: L ints. The Decoder (graphdef, state) gives the
  embedding, final norm and LM head (its stacked blocks are not read)."""
  dec = nnx.merge(graphdef, state)
  cfg = dec.cfg

  def x_fn(x, slot, caches):
    ks, vs = list(caches[0]), list(caches[1])
    for l, params in enumerate(layers):
      blk = nnx.merge(block_def, params)
      q, kn, vn = new_kv(blk, x, freqs[l], slot)
      ks[l], vs[l] = write_slot(ks[l], kn, slot), write_slot(vs[l], vn, slot)
      a = attend_layer(q, ks[l], vs[l], slot, windows[l], cfg.query_scale, cfg.attn_softcap)
      x = finish_layer(blk, x, a)
    return x, (tuple(ks), tuple(vs))

  return greedy(dec, x_fn, tok, slot, (tuple(k), tuple(v)), n)


class Layouts:
  """The model's params in both layouts: its own state (stacked blocks), and L per-layer Block
  states (copies, made once); the top of the model (embedding, final norm, LM head) shared."""

  def __init__(self, model: lm.Model):
    cfg = model.cfg
    if len(layer_runs(cfg, 0, cfg.n_layers)) != 1:
      raise ValueError(
        f"{cfg.family}: its layers mix dense and mixture-of-experts MLPs; this script scans one "
        "stacked run of layers"
      )
    self.model = model
    blocks = [layer_block(model.decoder.blocks, cfg, l) for l in range(cfg.n_layers)]
    self.block_def = nnx.graphdef(blocks[0])
    self.layers = tuple(nnx.state(b) for b in blocks)  # layer_block's slices: arrays of their own
    freqs = rope.layer_freqs(cfg)  # [L, H/2]
    self.freqs = jnp.asarray(freqs)
    self.layer_freqs = tuple(jnp.asarray(f) for f in freqs)
    self.windows = tuple(int(w) for w in cfg.windows)
    self.window_array = jnp.asarray(self.windows, jnp.int32)


def cell(layouts: Layouts, batch: int, context: int, n: int, repeats: int, seed: int) -> dict:
  """One cell's timings and token agreement (see the module docstring). kvjax's rounds are
  `lm.generate` calls timed as `bench.decode` times them (decode seconds / n); their tokens are
  what the other ways' first n must equal."""
  model = layouts.model
  rows = bench.prompts(batch, context, model.cfg.vocab_size, seed).tolist()
  logits, cache, _, _ = engine.prefill(model, rows, n)
  runs = {way: [] for way in WAYS}
  agree = {"kvjax": 1.0}
  for r in range(repeats + 1):  # round 0 compiles and warms up (untimed)
    out = generate(model, rows, max_new_tokens=n, stop_tokens=[])
    want = np.asarray(out.tokens)  # [B, n]
    times = {"kvjax": out.stats["decode_s"] / n}
    for way in WAYS[1:]:
      tokens, times[way] = timed_way(layouts, way, logits, cache, n)
      agree[way] = float(np.mean(np.asarray(tokens)[:, :n] == want))
    if r:
      for way in WAYS:
        runs[way].append(times[way])
  res = dict(batch=batch, context=context, steps=n)
  base = statistics.median(runs["kvjax"])
  for way in WAYS:
    ms = statistics.median(runs[way]) * 1e3
    res[way] = dict(ms=ms, runs_ms=[t * 1e3 for t in runs[way]], speedup=base * 1e3 / ms)
    res[way]["agree"] = agree[way]
  return res


def timed_way(layouts: Layouts, way: str, logits, cache, n: int):
  """(tokens [B, n + 1], seconds per step) of one way's n greedy steps from the prefill (its
  cache copied: each way donates and writes its own)."""
  m, L = layouts.model, layouts.model.cfg.n_layers
  tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  if way == "stacked":
    k, v = jnp.array(cache.k), jnp.array(cache.v)
    call = functools.partial(
      stacked_decode,
      m.graphdef,
      m.state,
      k,
      v,
      tok,
      cache.length,
      layouts.freqs,
      layouts.window_array,
      n=n,
    )
  else:
    k = tuple(jnp.array(cache.k[l]) for l in range(L))
    v = tuple(jnp.array(cache.v[l]) for l in range(L))
    call = functools.partial(
      per_layer_decode,
      m.graphdef,
      m.state,
      layouts.block_def,
      layouts.layers,
      k,
      v,
      tok,
      cache.length,
      layouts.layer_freqs,
      windows=layouts.windows,
      n=n,
    )
  jax.block_until_ready((k, v))
  t0 = time.perf_counter()
  tokens, _ = jax.block_until_ready(call())
  return tokens, (time.perf_counter() - t0) / n


def markdown(report: dict) -> str:
  m = report["model"]
  lines = [
    f"# layer layout: {m['name']} ({report['backend']})",
    "",
    f"{report['machine']}; copy bandwidth {report['bandwidth_gbs']['copy']:.1f} GB/s; "
    f"`python benchmarks/layer_layout.py {report['argv']}`",
    "",
    f"L {m['L']}, D {m['D']}, {m['dtype']}; {report['steps']} greedy steps per cell, median of "
    f"{report['repeats']} interleaved rounds; share: of the bandwidth bound; speed: kvjax's "
    "ms over this way's; agree: tokens equal to kvjax's.",
    "",
    "| batch | context | bound ms | "
    + " | ".join(f"{w} ms | {w} share" for w in WAYS)
    + " | stacked speed | per-layer speed | stacked agree | per-layer agree |",
    "|---:|---:|---:|" + "---:|" * (2 * len(WAYS) + 4),
  ]
  for c in report["cells"]:
    parts = [f"{c['batch']}", f"{c['context']:,}", f"{c['bound_ms']:.1f}"]
    for w in WAYS:
      parts += [f"{c[w]['ms']:.1f}", f"{c[w]['share']:.0%}"]
    parts += [f"{c[w]['speedup']:.2f}x" for w in WAYS[1:]]
    parts += [f"{c[w]['agree']:.3f}" for w in WAYS[1:]]
    lines.append("| " + " | ".join(parts) + " |")
  return "\n".join(lines) + "\n"


def cells_type(text: str) -> tuple[tuple[int, int], ...]:
  """'1/512,8/2048' -> ((1, 512), (8, 2048)); argparse's type for --cells."""
  out = []
  for part in filter(None, text.split(",")):
    b, _, c = part.partition("/")
    if not (b.isdigit() and c.isdigit() and int(b) >= 1 and int(c) >= 1):
      raise argparse.ArgumentTypeError(
        f"expected comma-separated BATCH/CONTEXT pairs of integers >= 1 (e.g. 1/512,8/2048); "
        f"got {text!r}"
      )
    out.append((int(b), int(c)))
  if not out:
    raise argparse.ArgumentTypeError("expected at least one BATCH/CONTEXT pair")
  return tuple(out)


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/layer_layout.py", description=__doc__.split("\n")[0]
  )
  ap.add_argument("--model", default="smollm2-135m-instruct", help="anything kvjax.lm.load takes")
  ap.add_argument(
    "--cells",
    type=cells_type,
    default="1/512,8/512,32/512,1/2048,8/2048,32/2048",
    help="BATCH/CONTEXT pairs",
  )
  ap.add_argument("--steps", type=positive, default=16, help="greedy steps timed per cell")
  ap.add_argument("--repeats", type=positive, default=3, help="timed rounds (median)")
  ap.add_argument("--seed", type=int, default=0, help="seed of the prompts")
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  try:
    lm_model.find(args.model)
  except FileNotFoundError as err:
    ap.error(f"--model: {err}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  model = lm.load(args.model)
  try:
    layouts = Layouts(model)
  except ValueError as err:
    sys.exit(f"python benchmarks/layer_layout.py: error: --model: {err}")
  longest = max(c for _, c in args.cells) + args.steps + 1
  if longest > model.cfg.max_position:
    sys.exit(
      f"python benchmarks/layer_layout.py: error: --cells: a context of {longest - args.steps - 1} "
      f"+ {args.steps + 1} tokens is more than the model's {model.cfg.max_position} positions"
    )
  bandwidth = bench.bandwidth()
  cells = []
  for batch, context in args.cells:
    print(f"batch {batch}, context {context}", file=sys.stderr)
    c = cell(layouts, batch, context, args.steps, args.repeats, args.seed)
    nbytes = bench.step_bytes(model, batch, context + args.steps / 2)["total"]
    c["bound_ms"] = nbytes / (bandwidth["copy"] * 1e9) * 1e3
    for way in WAYS:
      c[way]["share"] = c["bound_ms"] / c[way]["ms"]
    cells.append(c)
  cfg = model.cfg
  name = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
  report = dict(
    model=dict(name=name, L=cfg.n_layers, D=cfg.d_model, dtype=str(jnp.dtype(model.dtype))),
    backend=jax.default_backend(),
    machine=describe(),
    bandwidth_gbs=bandwidth,
    argv=" ".join(sys.argv[1:] if argv is None else argv),
    steps=args.steps,
    repeats=args.repeats,
    cells=cells,
  )
  table = markdown(report)
  print(table)
  write(args.out, f"layer_layout_{name}", report, table)
  return report


if __name__ == "__main__":
  main()
