"""`kvjax stream`: StreamingLLM generation or a multi-turn chat in constant memory
(`kvjax.lm.streaming.Session`)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvjax.lm.cli.flags import (
  PROG,
  add_model_flag,
  add_other_params_flag,
  add_sampling_flags,
  add_speculative_flags,
  check_sampling_flags,
  check_speculative_flags,
  checked,
  finite,
  load_model,
  nonneg,
  positive,
  sampling_from_flags,
  speculative_tree,
)
from kvjax.lm.cli.text import read_prompts, stdin_lines, text_type

NAME = "stream"
HELP = "endless generation or a multi-turn chat in constant memory (StreamingLLM)"
DESCRIPTION = (
  "Generates with a fixed memory budget: --sinks attention sinks plus a rolling "
  "window of --window tokens, positions assigned inside the cache. With --prompt: one "
  "endless continuation (until a stop token, --max-new-tokens or Ctrl-C; tokens are evicted "
  "one by one). Without: a chat, one turn per stdin line, each reply at most "
  "--max-new-tokens (default 64); each turn first evicts enough old tokens for its prompt "
  "and reply. Text is printed as it comes. With --speculative eagle --head H an EAGLE head "
  "drafts a tree per step, verified against the same cache (greedy output as without it)."
)


def add_flags(p: argparse.ArgumentParser) -> None:
  add_model_flag(p, chat=True)
  p.add_argument(
    "--prompt",
    default=None,
    type=text_type,
    metavar="TEXT",
    help="continue this text endlessly ('-' reads it from stdin); "
    "without it, chat: one turn per line of stdin",
  )
  p.add_argument(
    "--sinks",
    type=nonneg,
    default=4,
    metavar="N",
    help="attention sinks: the stream's first N tokens, kept for good (default 4)",
  )
  p.add_argument(
    "--window",
    type=checked(
      int,
      lambda v: v >= 1,
      "an integer >= 1 (the cache holds the sinks plus at least 1 recent token)",
    ),
    default=252,
    metavar="W",
    help="recent tokens kept (default 252: with 4 sinks, 256 slots)",
  )
  p.add_argument(
    "--chunk",
    type=positive,
    default=None,
    metavar="C",
    help="prompt tokens fed per step, at most --window (default min(W, 256))",
  )
  p.add_argument(
    "--max-new-tokens",
    type=positive,
    default=None,
    metavar="N",
    help="tokens per reply at most (chat: default 64, at most --window; "
    "--prompt: default unlimited)",
  )
  add_sampling_flags(p)
  add_speculative_flags(p, auto=False)
  add_other_params_flag(p, "a head")
  p.add_argument(
    "--json",
    action="store_true",
    help="print only one JSON object at the end: turns (prompt, text, finish), "
    "tokens_generated, peak_cache_tokens, tokens_per_s, timings",
  )
  p.set_defaults(run=_stream, check=lambda args: _check_stream(p, args))


def _check_stream(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  check_sampling_flags(parser, args)
  check_speculative_flags(parser, args)
  if args.chunk is not None and args.chunk > args.window:
    parser.error(
      f"--chunk {args.chunk} exceeds --window {args.window}: a prompt chunk must fit the window"
    )
  if args.prompt is None:
    if args.max_new_tokens is None:
      args.max_new_tokens = 64
    if args.max_new_tokens > args.window:
      parser.error(
        f"--max-new-tokens {args.max_new_tokens} exceeds --window {args.window}: in "
        "a chat each reply must fit the window"
      )


def _stream(args: argparse.Namespace) -> int:
  # a --prompt is read (and checked) before the model loads
  turns = iter(read_prompts([args.prompt])) if args.prompt is not None else stdin_lines()
  session = _session(args)
  record, code = [], 0
  t0 = time.perf_counter()
  try:
    for prompt in turns:
      done: dict = {}
      pieces = session.turn(
        prompt,
        max_new_tokens=args.max_new_tokens,
        stop=args.stop,
        chat=args.chat,
        done=done,
        keep_ids=False,
      )
      record.append({"prompt": prompt, "text": [], "finish": "interrupted"})
      for piece in pieces:  # the text is kept only for --json: an endless stream holds none
        if args.json:
          record[-1]["text"].append(piece)
        else:
          sys.stdout.write(piece)
          sys.stdout.flush()
      record[-1]["finish"] = done["finish"]
      if not args.json:
        sys.stdout.write("\n")
        sys.stdout.flush()
  except KeyboardInterrupt:
    code = 130
    if not args.json:
      sys.stdout.write("\n")
  wall_s = time.perf_counter() - t0  # prefill, decode, detokenisation, printing, compile
  for turn in record:
    turn["text"] = "".join(turn["text"])
  _report(args, session.stats, record, wall_s)
  return code


def _session(args: argparse.Namespace):
  """The model loaded and its session: plain, or speculating with --head."""
  model = load_model(args)
  sampling, key = sampling_from_flags(args)
  cache = dict(n_sink=args.sinks, window=args.window, chunk=args.chunk)
  if not args.speculative:
    from kvjax.lm.streaming import Session

    return Session(model, **cache, sampling=sampling, key=key)
  from kvjax import speculative

  head = speculative.load_head(args.head, model, allow_other_params=args.allow_other_params)
  prompts = None if args.prompt is None else [args.prompt]
  args.tree = speculative_tree(args, model, head, prompts, chat=args.chat, sampling=sampling)
  if args.tree is None:
    from kvjax.lm.streaming import Session

    return Session(model, **cache, sampling=sampling, key=key)
  return speculative.StreamingSession(
    model, head, **cache, tree=args.tree, sampling=sampling, key=key
  )


def _report(args: argparse.Namespace, s: dict, record: list[dict], wall_s: float) -> None:
  """The run's JSON object (--json, on stdout), else its summary line on stderr."""
  spec = (
    dict(
      speculative=args.speculative,
      head=args.head,
      tree=dict(top_k=args.tree.top_k, depth=args.tree.depth, total_tokens=args.tree.total_tokens),
      rounds=s["rounds"],
      mean_accept_len=finite(s["mean_accept_len"]),
    )
    if args.tree is not None
    else dict(speculative=args.speculative, head=args.head, tree=None)
    if args.speculative
    else {}
  )
  if args.json:
    print(
      json.dumps(
        {
          "model": args.model,
          "sinks": args.sinks,
          "window": args.window,
          "turns": record,
          "tokens_generated": s["tokens_generated"],
          "prompt_tokens": s["prompt_tokens"],
          "peak_cache_tokens": s["peak_cache_tokens"],
          "tokens_per_s": finite(s["tokens_per_s"]),
          "prefill_s": s["prefill_s"],
          "decode_s": s["decode_s"],
          "compile_s": s["compile_s"],
          "wall_s": wall_s,
          **spec,
        }
      )
    )
    return
  print(
    f"{PROG}: {s['tokens_generated']} tokens generated in {s['decode_s']:.2f} s "
    f"({s['tokens_per_s']:.1f} tok/s, decoding and detokenising) over {len(record)} "
    f"turn(s); {wall_s:.2f} s in all with prefill {s['prefill_s']:.2f} s and compile "
    f"{s['compile_s']:.2f} s; peak cache {s['peak_cache_tokens']} tokens of "
    f"{args.sinks} sinks + {args.window} window"
    + (
      f"; {s['mean_accept_len']:.2f} tokens per target forward ({s['rounds']} forwards)"
      if args.tree is not None
      else "; plain decoding (the measured default: no tree is faster here)"
      if args.speculative
      else ""
    ),
    file=sys.stderr,
  )
