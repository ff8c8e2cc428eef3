"""The methods' own steps on the target model, timed by their shapes: Skeleton-of-Thought's
batched point expansion, EAGLE's tree verification and the coprocessor's cache augmentation.

    python benchmarks/method_steps.py --model smollm2-135m-instruct [--dtype float32] \
        [--contexts 512,2048] [--points 4,8] [--batches 1,4] [--repeats 10]

What a method's step costs on the target is set by its shapes, not by what drafted the tree or
trained the coprocessor, so the inputs are synthetic: random prompts, a draft tree grown from
random draft logits, a coprocessor freshly made for the model. Per context C (random prompts of
C tokens, prefilled untimed):

  sot          `steps.decode_more`, the loop `kvjax.lm.sot.expand` runs, on P rows that share a
               C-token prefix in one `PrefixCache` (each row --suffix tokens of its own after
               it, as SoT's point prompts; built as `expand` builds it), --steps steps per
               call: ms per step (one token for each of the P rows). Against the same loop on
               one row of prefix + suffix in a plain cache (`single`: what expanding the points
               one after another runs) and on P rows that each store the whole prompt
               (`repeated`: `expand(share=False)`). speedup = P x single / shared, what
               batching the points buys per token.
  eagle        the target forward of a speculative round (`speculative.decoding.draft_verify`):
               the T nodes of a draft tree of `TreeSpec(total_tokens=T)` (grown by EAGLE-2's
               `speculative.tree.draft` from synthetic draft distributions: `synthetic_tree`)
               at positions C + depth over a cache of C tokens, read through
               `speculative.verify.tree_view`, with logits for every node and the tree's K/V
               out; one call, batch B. Against one `steps.decode_step` on the same cache
               (ratio verify / step) and one step of `steps.decode_loop` (lm.generate's loop,
               --steps steps per call).
  coprocessor  `coprocessor.augment` (the coprocessor over N soft tokens reading the cache,
               then the frozen model over the N latents: one jitted call) with
               `coprocessor.init(model, N)` (its default config: a copy of the model's layers,
               random soft tokens), batch B, in the cache `augmented_prefill` sizes; the
               `steps.decode_step` after it (C + N slots filled) and the one before it.

Compilation is excluded (a warm-up call first). Each call gets its own copy of its cache, made
untimed, and is timed to `block_until_ready`; medians of --repeats, every run in the JSON.
Writes <out>/method_steps_<model>_<dtype>_<backend>.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from report import describe, write

from kvjax import coprocessor, lm
from kvjax.cache.prefix import PrefixCache
from kvjax.lm import engine, steps
from kvjax.lm.bench import prompts
from kvjax.lm.cli import positive
from kvjax.lm.cli.flags import ints_type
from kvjax.lm.sampling import Sampling
from kvjax.speculative import tree as trees
from kvjax.speculative import verify
from kvjax.speculative.generate import sizes

PARTS = ("sot", "eagle", "coprocessor")
DRAFT_RATIO = 0.2  # eagle: each rank of a synthetic draft distribution this much less likely


def parse_args(argv=None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(
    prog="python benchmarks/method_steps.py", description=__doc__.split("\n")[0]
  )
  ap.add_argument(
    "--model", default="smollm2-135m-instruct", help="a name, GGUF file or directory lm.load takes"
  )
  ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  ap.add_argument("--parts", default=",".join(PARTS), help=f"some of {','.join(PARTS)}")
  ap.add_argument("--contexts", type=ints_type, default="512,2048", help="cache lengths C")
  ap.add_argument("--points", type=ints_type, default="4,8", help="sot: points P in one batch")
  ap.add_argument("--suffix", type=positive, default=16, help="sot: each point's own tokens")
  ap.add_argument("--batches", type=ints_type, default="1,4", help="eagle, coprocessor: batch B")
  ap.add_argument("--tree-tokens", type=ints_type, default="32", help="eagle: tree sizes T")
  ap.add_argument("--latents", type=ints_type, default="16", help="coprocessor: latents N")
  ap.add_argument("--steps", type=positive, default=16, help="decode steps per loop call")
  ap.add_argument("--repeats", type=positive, default=10)
  ap.add_argument(
    "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  )
  args = ap.parse_args(argv)
  args.parts = tuple(p for p in args.parts.split(",") if p)
  if not args.parts or set(args.parts) - set(PARTS):
    ap.error(f"--parts takes some of {','.join(PARTS)}; got {','.join(args.parts)!r}")
  for t in args.tree_tokens:
    try:
      trees.TreeSpec(total_tokens=t)
    except ValueError as e:
      ap.error(f"--tree-tokens: {e}")
  return args


def copied(tree):
  """A copy of a pytree of arrays on their devices (a donated cache is gone after its call)."""
  return jax.block_until_ready(jax.tree.map(jnp.copy, tree))


def times_ms(run, cache, repeats: int) -> list[float]:
  """ms of run(a fresh copy of cache), to block_until_ready, over `repeats` calls after an
  untimed warm-up call (which compiles); the copies are made before the clock starts."""
  out = []
  for i in range(repeats + 1):
    c = copied(cache)
    t0 = time.perf_counter()
    jax.block_until_ready(run(c))
    if i:
      out.append((time.perf_counter() - t0) * 1e3)
  return out


def median(ms: list[float], per: int = 1) -> float:
  return statistics.median(ms) / per


# --- sot ---------------------------------------------------------------------------------------


def loop_ms(model, cache, logits, n_steps: int, repeats: int) -> list[float]:
  """ms per call of `steps.decode_more` (SoT's expansion loop), n_steps greedy steps, every
  row running all of them."""
  B = logits.shape[0]
  args = (
    logits,
    jax.random.key(0),
    jnp.int32(0),
    jnp.zeros((B,), bool),
    jnp.zeros((B,), jnp.int32),
    jnp.full((B,), n_steps, jnp.int32),
    jnp.full((1,), -1, jnp.int32),
  )
  static = dict(sampling=Sampling(), max_steps=n_steps)
  return times_ms(
    lambda c: steps.call(model, steps.decode_more, c, *args, **static)[0], cache, repeats
  )


def shared_prefill(model, prefix: list[int], suffixes: list[list[int]], budget: int):
  """(logits [P, V], PrefixCache) as `sot.expand` prefills point prompts prefix + suffixes[p]:
  the prefix once into a one-row cache, each row's suffix into its own slots after it."""
  _, pre, _, _ = engine.prefill(model, [prefix], 0)
  longest = max(map(len, suffixes))
  tokens = engine.pad(suffixes, steps.bucket(longest, minimum=8))
  own = engine.new_cache(model, len(suffixes), steps.bucket(longest + budget))
  (logits, cache), _ = steps.call(
    model,
    steps.extend,
    PrefixCache(prefix=pre, rows=own),
    jnp.asarray(tokens),
    jnp.asarray([len(s) for s in suffixes], jnp.int32),
  )
  return logits, cache


def sot_cell(model, P: int, C: int, args) -> dict:
  V, n = model.cfg.vocab_size, args.steps
  prefix = prompts(1, C, V, seed=0)[0].tolist()
  suffixes = prompts(P, args.suffix, V, seed=1).tolist()
  rows = [prefix + s for s in suffixes]
  logits, cache = shared_prefill(model, prefix, suffixes, n)
  shared = loop_ms(model, cache, logits, n, args.repeats)
  del cache
  logits, cache, _, _ = engine.prefill(model, rows[:1], n)
  single = loop_ms(model, cache, logits, n, args.repeats)
  del cache
  logits, cache, _, _ = engine.prefill(model, rows, n)
  repeated = loop_ms(model, cache, logits, n, args.repeats)
  del cache
  ms = dict(shared=median(shared, n), single=median(single, n), repeated=median(repeated, n))
  return dict(
    points=P,
    context=C,
    suffix=args.suffix,
    ms_per_step=ms,
    speedup=P * ms["single"] / ms["shared"],
    repeated_over_shared=ms["repeated"] / ms["shared"],
    runs_ms_per_call=dict(shared=shared, single=single, repeated=repeated),
  )


# --- eagle -------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def verify_forward(graphdef, state, cache, tokens, depth, mask):
  """The target's pass over draft trees in a speculative round (as `draft_verify` runs it):
  tokens, depth [B, T] and mask [B, T, T] of `speculative.Tree`s over a KVCache of n = length
  tokens per row, each node at position n + its depth -> (logits [B, T, V], k, v [L, B, K, T,
  H] of the nodes, the cache: its length unchanged)."""
  dec = nnx.merge(graphdef, state)
  view = verify.tree_view(cache, depth, mask)
  out, cache = dec(
    tokens, cache=cache, view=view, n_new=jnp.zeros((tokens.shape[0],), jnp.int32), return_kv=True
  )
  return out.logits, out.k, out.v, cache


def synthetic_tree(batch: int, vocab: int, spec: trees.TreeSpec, seed: int = 0) -> trees.Tree:
  """B draft trees of spec's size grown by EAGLE-2's `tree.draft` from synthetic draft
  distributions in place of a head's: each node's next-token distribution a geometric one,
  DRAFT_RATIO times less likely per rank, over a random order of the vocabulary (its first
  choice 1 - DRAFT_RATIO likely). The tree's shape is then the same for any vocabulary and
  seed (TreeSpec's default: nodes per depth 0..5 are 1, 3, 6, 10, 6, 6)."""
  key = jax.random.key(seed)
  calls = itertools.count()

  def draft_logits(shape):
    order = jax.random.uniform(jax.random.fold_in(key, next(calls)), (*shape, vocab))
    return jnp.log(DRAFT_RATIO) * jnp.argsort(jnp.argsort(order, axis=-1), axis=-1)

  def step(feats, tokens, positions, anc):
    return feats, draft_logits(tokens.shape)

  zeros = jnp.zeros((batch,), jnp.int32)
  return trees.draft(step, jnp.zeros((batch, 1)), draft_logits((batch,)), zeros, zeros, spec)


def eagle_cell(model, B: int, C: int, args) -> list[dict]:
  n = args.steps
  T_max = max(args.tree_tokens)
  _, S, _ = sizes(C, n, trees.TreeSpec(total_tokens=T_max))
  ids = jnp.asarray(prompts(B, C, model.cfg.vocab_size, seed=0), jnp.int32)
  (logits, cache), _ = steps.call(
    model, steps.prefill, engine.new_cache(model, B, S), ids, jnp.full((B,), C, jnp.int32)
  )
  tok = jnp.zeros((B,), jnp.int32)
  step = times_ms(lambda c: steps.call(model, steps.decode_step, c, tok)[0], cache, args.repeats)
  static = dict(sampling=Sampling(), max_steps=n)
  loop_args = (logits, jax.random.key(0), jnp.int32(n), jnp.full((1,), -1, jnp.int32))
  loop = times_ms(
    lambda c: steps.call(model, steps.decode_loop, c, *loop_args, **static)[0], cache, args.repeats
  )
  cells = []
  for T in args.tree_tokens:
    tree = synthetic_tree(B, model.cfg.vocab_size, trees.TreeSpec(total_tokens=T))
    run = lambda c, t=tree: steps.call(model, verify_forward, c, t.tokens, t.depth, t.mask)[0]
    runs = times_ms(run, cache, args.repeats)
    cells.append(
      dict(
        batch=B,
        context=C,
        cache_slots=S,
        tree_tokens=T,
        tree_depth=int(jnp.max(tree.depth)),
        verify_ms=median(runs),
        decode_step_ms=median(step),
        loop_step_ms=median(loop, n),
        verify_over_step=median(runs) / median(step),
        runs_ms=dict(verify=runs, decode_step=step, loop_per_call=loop),
      )
    )
  return cells


# --- coprocessor -------------------------------------------------------------------------------


def coprocessor_cell(model, cop, B: int, C: int, args) -> dict:
  N = cop.n_latents
  S = steps.bucket(C + N + args.steps)  # as coprocessor.augmented_prefill sizes it
  ids = jnp.asarray(prompts(B, C, model.cfg.vocab_size, seed=0), jnp.int32)
  (_, cache), _ = steps.call(
    model, steps.prefill, engine.new_cache(model, B, S), ids, jnp.full((B,), C, jnp.int32)
  )
  tok = jnp.zeros((B,), jnp.int32)
  decode = lambda c: steps.call(model, steps.decode_step, c, tok)[0]
  augment = times_ms(lambda c: coprocessor.augment(model, cop, c), cache, args.repeats)
  before = times_ms(decode, cache, args.repeats)
  augmented = coprocessor.augment(model, cop, copied(cache))
  after = times_ms(decode, augmented, args.repeats)
  return dict(
    batch=B,
    context=C,
    latents=N,
    cache_slots=S,
    augment_ms=median(augment),
    decode_step_before_ms=median(before),
    decode_step_after_ms=median(after),
    augment_over_step=median(augment) / median(before),
    runs_ms=dict(augment=augment, decode_step_before=before, decode_step_after=after),
  )


# --- report ------------------------------------------------------------------------------------


def markdown(rep: dict) -> str:
  s = rep["settings"]
  lines = [
    f"# method steps: {rep['model']} ({rep['dtype']}, {rep['backend']})",
    "",
    f"{rep['machine']}; load average {rep['load_average_start'][0]:.1f} at start, "
    f"{rep['load_average_end'][0]:.1f} at end; medians of {s['repeats']}, compilation excluded; "
    f"`python benchmarks/method_steps.py {rep['argv']}`",
  ]
  if rep.get("sot"):
    lines += [
      "",
      f"Skeleton-of-Thought: `steps.decode_more` ({s['steps']} steps per call), ms per step "
      f"(a token for each row); P rows sharing a C-token prefix + {s['suffix']} tokens each",
      "",
      "| points | context | shared (P rows) | single row | repeated prefix (P rows) "
      "| speedup P x single / shared | repeated / shared |",
      "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["sot"]:
      ms = r["ms_per_step"]
      lines.append(
        f"| {r['points']} | {r['context']} | {ms['shared']:.2f} | {ms['single']:.2f} | "
        f"{ms['repeated']:.2f} | **{r['speedup']:.2f}x** | {r['repeated_over_shared']:.2f}x |"
      )
  if rep.get("eagle"):
    lines += [
      "",
      "EAGLE: the target's verify pass over a T-node draft tree (one call) against one "
      f"decode step (one `steps.decode_step` call; loop: a step of `steps.decode_loop`, "
      f"{s['steps']} per call), ms",
      "",
      "| batch | context | tree tokens | verify | decode step | loop step | verify / step |",
      "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["eagle"]:
      lines.append(
        f"| {r['batch']} | {r['context']} | {r['tree_tokens']} | {r['verify_ms']:.2f} | "
        f"{r['decode_step_ms']:.2f} | {r['loop_step_ms']:.2f} | **{r['verify_over_step']:.2f}x** |"
      )
  if rep.get("coprocessor"):
    lines += [
      "",
      "Coprocessor: `coprocessor.augment` (one call) and the decode step before and after it "
      "(one `steps.decode_step` call), ms",
      "",
      "| batch | context | latents | augment | step before | step after | augment / step |",
      "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["coprocessor"]:
      lines.append(
        f"| {r['batch']} | {r['context']} | {r['latents']} | {r['augment_ms']:.2f} | "
        f"{r['decode_step_before_ms']:.2f} | {r['decode_step_after_ms']:.2f} | "
        f"**{r['augment_over_step']:.2f}x** |"
      )
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  args = parse_args(argv)
  model = lm.load(args.model, dtype=args.dtype)
  longest = max(args.contexts) + max(args.suffix, max(args.tree_tokens), max(args.latents))
  if longest + args.steps > model.cfg.max_position:
    raise SystemExit(
      f"--contexts up to {max(args.contexts)} need {longest + args.steps} positions; "
      f"{args.model} has {model.cfg.max_position}"
    )
  name = os.path.basename(args.model.rstrip("/")).removesuffix(".gguf")
  settings = {k: v for k, v in vars(args).items() if k not in ("model", "dtype", "out")}
  rep = dict(
    model=name,
    dtype=args.dtype,
    backend=jax.default_backend(),
    machine=describe(),
    load_average_start=list(os.getloadavg()),
    argv=" ".join(sys.argv[1:] if argv is None else argv),
    settings=settings,
    tree=dict(top_k=trees.TreeSpec().top_k, depth=trees.TreeSpec().depth),
  )
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  if "sot" in args.parts:
    rep["sot"] = []
    for C, P in itertools.product(args.contexts, args.points):
      log(f"sot: {P} points, context {C}")
      rep["sot"].append(sot_cell(model, P, C, args))
  if "eagle" in args.parts:
    rep["eagle"] = []
    for C, B in itertools.product(args.contexts, args.batches):
      log(f"eagle: batch {B}, context {C}")
      rep["eagle"] += eagle_cell(model, B, C, args)
  if "coprocessor" in args.parts:
    rep["coprocessor"] = []
    for N in args.latents:
      cop = coprocessor.init(model, N)
      for C, B in itertools.product(args.contexts, args.batches):
        log(f"coprocessor: {N} latents, batch {B}, context {C}")
        rep["coprocessor"].append(coprocessor_cell(model, cop, B, C, args))
      del cop
  rep["load_average_end"] = list(os.getloadavg())
  stem = write(args.out, f"method_steps_{name}_{args.dtype}", rep, markdown(rep))
  print(markdown(rep))
  log(f"wrote {stem}.json and .md")
  return rep


if __name__ == "__main__":
  main()
