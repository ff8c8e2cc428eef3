"""`kvjax ppl`: perplexity of a text through a streaming cache (`kvjax.lm.streaming`), or by
position after a coprocessor's latents."""

from __future__ import annotations

import argparse
import json

from kvjax.lm.cli.flags import DTYPES, add_model_flag, checked, model_and_text, nonneg, positive
from kvjax.lm.cli.paths import check_input_file


def add(subparsers) -> None:
  from kvjax.lm.streaming import MODES

  p = subparsers.add_parser(
    "ppl",
    help="streaming perplexity of a long text (StreamingLLM)",
    description="Feeds a text token by token and reports its perplexity under a cache "
    "policy: dense (everything kept), window (rolling window, no sinks), sink (attention "
    "sinks + rolling window), recompute (the last W tokens recomputed for every token).",
  )
  add_model_flag(p)
  p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file ('-' = stdin)")
  p.add_argument("--cache", choices=MODES, default=None, help="cache policy (default sink)")
  p.add_argument(
    "--sinks",
    type=nonneg,
    default=None,
    metavar="N",
    help="attention sinks (--cache sink; default 4)",
  )
  p.add_argument(
    "--window",
    type=positive,
    default=None,
    metavar="W",
    help="recent tokens kept (window, sink) or recomputed (recompute), the token "
    "being scored included: the streaming-llm reference's recent_size is W - 1",
  )
  p.add_argument(
    "--dtype",
    choices=DTYPES,
    default=None,
    help="cast the params to this dtype (default: as stored; float32 for the bundled "
    "models, which are stored in bfloat16)",
  )
  _add_coprocessor_flags(p)
  p.add_argument(
    "--allow-other-params",
    action="store_true",
    help="use a coprocessor trained against other weights of the same "
    "architecture (it records their fingerprint; a warning is printed)",
  )
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
  g = p.add_argument_group(
    "cache augmentation: perplexity of the 1st .. A-th token after augmentation points, with "
    "and without the coprocessor's latents (instead of a streaming run)"
  )
  g.add_argument(
    "--coprocessor",
    metavar="DIR_OR_NAME",
    default=None,
    help="coprocessor directory or shipped name (e.g. shakespeare-16)",
  )
  g.add_argument(
    "--ahead",
    type=positive,
    default=32,
    metavar="A",
    help="positions after each point to score (default 32)",
  )
  g.add_argument(
    "--points",
    type=positive,
    default=16,
    metavar="M",
    help="augmentation points per window, spread evenly (default 16)",
  )
  g.add_argument(
    "--seq-len",
    type=checked(int, lambda v: v >= 2, "an integer >= 2"),
    default=256,
    metavar="T",
    help="the text is cut into windows of T tokens "
    "(default 256); points read only their own window",
  )
  g.add_argument(
    "--delay",
    type=nonneg,
    default=0,
    metavar="K",
    help="insert the latents K tokens after their point (default 0)",
  )
  g.add_argument(
    "--batch-size", type=positive, default=8, metavar="B", help="windows per forward (default 8)"
  )


def _check_ppl(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  check_input_file(parser, "--text", args.text)
  if args.coprocessor is not None:
    given = [f"--{f}" for f in ("cache", "sinks", "window") if getattr(args, f) is not None]
    if given:
      parser.error(f"{', '.join(given)}: streaming-cache flags do not apply with --coprocessor")
    from kvjax.coprocessor.model import resolve as resolve_cop

    try:
      resolve_cop(args.coprocessor)
    except FileNotFoundError as err:
      parser.error(f"--coprocessor: {err}")
    from kvjax.coprocessor.traces import room_error

    error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
    if error:
      parser.error(error)
    return
  changed = [
    f"--{f.replace('_', '-')}"
    for f, d in (("ahead", 32), ("points", 16), ("seq_len", 256), ("delay", 0), ("batch_size", 8))
    if getattr(args, f) != d
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
    progress=not args.no_progress and not args.json,
  )
  n_sink = (4 if args.sinks is None else args.sinks) if args.cache == "sink" else 0
  out = {
    "model": args.model,
    "cache": args.cache,
    "sinks": n_sink,
    "window": args.window,
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
