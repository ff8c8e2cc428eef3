"""`kvjax ppl`: perplexity of a text through a streaming cache (`kvjax.lm.streaming`), or by
position after a coprocessor's latents."""

from __future__ import annotations

import argparse
import json

from kvjax.lm.cli.flags import (
  add_coprocessor_group,
  add_dtype_flag,
  add_model_flag,
  add_other_params_flag,
  add_value_flags,
  check_coprocessor,
  checked,
  dest,
  model_and_text,
  nonneg,
  positive,
)
from kvjax.lm.cli.paths import check_input_file

NAME = "ppl"
HELP = "streaming perplexity of a long text (StreamingLLM)"
DESCRIPTION = (
  "Feeds a text through a cache that evicts token by token (chunks per forward, equal to "
  "one token at a time) and reports its perplexity under a cache "
  "policy: dense (everything kept), window (rolling window, no sinks), sink (attention "
  "sinks + rolling window), recompute (the last W tokens recomputed for every token)."
)
# (flag, type, default, metavar, help) of the streaming run; None: set by the --cache policy
CACHE_FLAGS = (
  ("--sinks", nonneg, None, "N", "attention sinks (--cache sink; default 4)"),
  (
    "--window",
    positive,
    None,
    "W",
    "recent tokens kept (window, sink) or recomputed (recompute), the token "
    "being scored included: the streaming-llm reference's recent_size is W - 1",
  ),
  (
    "--every",
    positive,
    None,
    "K",
    "--cache recompute: score every K-th token after the first window (default 1: all; "
    "each costs a forward over W tokens)",
  ),
)
# ... and of the run by position after augmentation points (--coprocessor)
AUGMENTATION_FLAGS = (
  ("--ahead", positive, 32, "A", "positions after each point to score (default 32)"),
  ("--points", positive, 16, "M", "augmentation points per window, spread evenly (default 16)"),
  (
    "--seq-len",
    checked(int, lambda v: v >= 2, "an integer >= 2"),
    256,
    "T",
    "the text is cut into windows of T tokens (default 256); points read only their own window",
  ),
  ("--delay", nonneg, 0, "K", "insert the latents K tokens after their point (default 0)"),
  ("--batch-size", positive, 8, "B", "windows per forward (default 8)"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
  from kvjax.lm.streaming import MODES

  add_model_flag(p)
  p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file ('-' = stdin)")
  p.add_argument("--cache", choices=MODES, default=None, help="cache policy (default sink)")
  add_value_flags(p, CACHE_FLAGS)
  add_dtype_flag(p)
  _add_coprocessor_flags(p)
  add_other_params_flag(p, "a coprocessor")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument(
    "--json",
    action="store_true",
    help="print one JSON object: ppl, tokens, peak_cache_tokens, ms_per_token "
    "(with --coprocessor: ppl_base_by_position, ppl_aug_by_position, "
    "relative_reduction_by_position, ...)",
  )
  p.set_defaults(run=_ppl, check=lambda args: _check_ppl(p, args))


def _add_coprocessor_flags(p: argparse.ArgumentParser) -> None:
  """--coprocessor and the augmentation points it is scored at (instead of a streaming run)."""
  g = add_coprocessor_group(
    p,
    "cache augmentation: perplexity of the 1st .. A-th token after augmentation points, with "
    "and without the coprocessor's latents (instead of a streaming run)",
    "coprocessor directory or shipped name (e.g. shakespeare-16)",
  )
  add_value_flags(g, AUGMENTATION_FLAGS)


def _check_ppl(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  check_input_file(parser, "--text", args.text)
  if args.coprocessor is not None:
    given = [
      f"--{f}" for f in ("cache", "sinks", "window", "every") if getattr(args, f) is not None
    ]
    if given:
      parser.error(f"{', '.join(given)}: streaming-cache flags do not apply with --coprocessor")
    check_coprocessor(parser, args)
    from kvjax.coprocessor.traces import room_error

    error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
    if error:
      parser.error(error)
    return
  changed = [
    flag for flag, _, default, *_ in AUGMENTATION_FLAGS if getattr(args, dest(flag)) != default
  ]
  if changed:
    parser.error(f"{', '.join(changed)} apply only with --coprocessor")
  args.cache = args.cache or "sink"
  if args.cache == "dense" and (args.window is not None or args.sinks is not None):
    parser.error("--cache dense keeps every token: --window and --sinks do not apply")
  if args.cache in ("window", "recompute") and args.sinks:
    parser.error(f"--cache {args.cache} keeps no sinks; --sinks applies to --cache sink")
  if args.cache != "dense" and args.window is None:
    parser.error(f"--cache {args.cache} needs --window W")
  if args.every is not None and args.cache != "recompute":
    parser.error(f"--every applies to --cache recompute; --cache {args.cache} scores every token")


def _ppl(args: argparse.Namespace) -> int:
  from kvjax.lm.streaming import perplexity

  model, ids = model_and_text(args)
  if args.coprocessor is not None:
    return _ppl_augmented(args, model, ids)
  got = perplexity(
    model,
    ids,
    cache=args.cache,
    n_sink=args.sinks,
    window=args.window,
    every=args.every or 1,
    progress=not args.no_progress and not args.json,
  )
  n_sink = (4 if args.sinks is None else args.sinks) if args.cache == "sink" else 0
  out = {
    "model": args.model,
    "cache": args.cache,
    "sinks": n_sink,
    "window": args.window,
    "every": args.every or 1,
    "ppl": got.ppl,
    "tokens": got.tokens,
    "peak_cache_tokens": got.peak_cache_tokens,
    "ms_per_token": got.ms_per_token,
  }
  if args.json:
    print(json.dumps(out))
  else:
    print(
      f"ppl {got.ppl:.3f} over {got.tokens:,} tokens ({args.cache}, peak cache "
      f"{got.peak_cache_tokens:,} tokens, {got.ms_per_token:.2f} ms/token)"
    )
  return 0


def _ppl_augmented(args: argparse.Namespace, model, ids: list[int]) -> int:
  """`kvjax ppl --coprocessor`: perplexity by position after augmentation points."""
  import numpy as np

  from kvjax import coprocessor
  from kvjax.coprocessor.traces import by_position

  cop = coprocessor.load(args.coprocessor, model, allow_other_params=args.allow_other_params)
  T = args.seq_len
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens")
  n = -(-(len(ids) - 1) // T)  # windows of T targets; consecutive windows share one token
  windows = np.full((n, T + 1), -1, np.int64)
  for r in range(n):
    w = ids[r * T : r * T + T + 1]
    windows[r, : len(w)] = w
  got = by_position(
    model,
    cop,
    windows,
    ahead=args.ahead,
    points=args.points,
    delay=args.delay,
    batch_size=args.batch_size,
    progress=not args.no_progress and not args.json,
  )
  out = {
    "model": args.model,
    "coprocessor": args.coprocessor,
    "latents": cop.n_latents,
    "kind": cop.cc.kind,
    "delay": args.delay,
    "seq_len": T,
    "tokens": len(ids),
    "windows": n,
    **got.to_json(),
  }
  if args.json:
    print(json.dumps(out))
    return 0
  red = got.relative_reduction
  print(
    f"{args.coprocessor} ({cop.n_latents} latents) on {len(ids):,} tokens, {got.points:,} "
    f"points, delay {args.delay}:"
  )
  print("position  ppl base  ppl aug  reduction")
  for a in sorted({0, 1, 3, 7, 15, 31, args.ahead - 1} & set(range(args.ahead))):
    print(f"{a + 1:8d}  {got.ppl_base[a]:8.3f}  {got.ppl_aug[a]:7.3f}  {100 * red[a]:+8.2f}%")
  print(
    f"all {args.ahead}: loss {got.loss_base:.4f} -> {got.loss_aug:.4f} nats "
    f"(perplexity reduction {100 * out['relative_reduction_all']:+.2f}%)"
  )
  return 0
