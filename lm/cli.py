"""The `kvjax` command line: one program, one subcommand per job, `--json` for machines.

    kvjax generate --prompt "ROMEO:" [--model DIR_OR_NAME] [--max-new-tokens 64] [--json]
    kvjax stream --prompt "ROMEO:" --sinks 4 --window 252      (or a chat from stdin)
    kvjax ppl --text FILE --cache sink --window 252
    kvjax generate --prompt "ROMEO:" --coprocessor shakespeare-16 [--delay 2]
    kvjax ppl --text FILE --coprocessor shakespeare-16 --json   (ppl by position after points)
    kvjax droidspeak {run,send,receive} --plan 0-1 --prompt-file FILE   (kvjax.lm.droidspeak_cli)
    kvjax sot --question "..." [--skeleton "1. ...\\n2. ..."] [--json]      (kvjax.lm.sot_cli)
    kvjax bench [--model DIR_OR_NAME] [--batches 1,8] [--contexts 256,4096] [--json]
    python -m kvjax generate ...

Each subcommand is added by its own `_add_<name>(subparsers)` function, which sets `run` (does
the work, returns the exit code) and `check` (cross-flag validation, reports through the
subcommand's parser). Bad flags exit 2 with an argparse message; a model or input the library
rejects exits 1 with `kvjax: error: <message>` and no traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable

from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import ConfigError
from kvjax.lm.model import bundled
from kvjax.lm.tokenizer import TokenizerError

PROG = "kvjax"
# What the library raises for a model or input it cannot use: shown as one line, exit 1.
LIBRARY_ERRORS = (ConfigError, CheckpointError, TokenizerError, FileNotFoundError, ValueError)
DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL = "shakespeare"  # bundled (see MODELS.md)


def checked(kind: type, ok: Callable[[float], bool], expected: str) -> Callable[[str], float]:
  """An argparse `type` that parses `kind` and rejects values failing `ok` (and non-finite
  floats) with `expected`. Shared by every kvjax command line."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if not ok(value) or (kind is float and not math.isfinite(value)):
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text}")
    return value

  parse.__name__ = kind.__name__  # argparse names the type in some messages
  return parse


positive = checked(int, lambda v: v >= 1, "an integer >= 1")
nonneg = checked(int, lambda v: v >= 0, "an integer >= 0")
temperature_type = checked(float, lambda t: t >= 0, "a number >= 0 (0 = greedy decoding)")
top_k_type = checked(int, lambda k: k >= 0, "an integer >= 0 (0 = off)")
top_p_type = checked(float, lambda p: 0 < p <= 1, "a number in (0, 1] (1 = off)")


def add_model_flag(p: argparse.ArgumentParser) -> None:
  """--model DIR_OR_NAME, default the bundled DEFAULT_MODEL (every subcommand that loads one)."""
  p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR_OR_NAME",
                 help=f"model directory or bundled model name (default {DEFAULT_MODEL})")


def build_parser() -> argparse.ArgumentParser:
  """The `kvjax` parser with every subcommand."""
  parser = argparse.ArgumentParser(
      prog=PROG, description="LLM inference in JAX with the KV cache as an explicit value.")
  subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  _add_generate(subparsers)
  _add_stream(subparsers)
  _add_ppl(subparsers)
  _add_train(subparsers)
  _add_bench(subparsers)
  from kvjax.lm import droidspeak_cli
  droidspeak_cli.add(subparsers)
  from kvjax.lm import sot_cli
  sot_cli.add(subparsers)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs `kvjax ARGV...`; returns the exit code (0 ok, 1 library error, 2 bad flags)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv[:1] == ["train"]:  # forwarded whole, so `kvjax train --help` is the trainer's help
    from kvjax.train.cli import main as train_main
    return train_main(argv[1:], prog=f"{PROG} train")
  return run(build_parser(), argv, lambda args: PROG)


def run(parser: argparse.ArgumentParser, argv: list[str] | None, label) -> int:
  """Parses argv, runs the chosen subcommand; library errors print `label(args): error: ...`
  and give 1, bad flags 2 (argparse's own message), Ctrl-C 130."""
  try:
    args = parser.parse_args(argv)
    args.check(args)
  except SystemExit as done:  # argparse's error() (2) and --help (0)
    return done.code or 0
  try:
    return args.run(args)
  except LIBRARY_ERRORS as err:
    print(f"{label(args)}: error: {err}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print(file=sys.stderr)
    return 130


# --- bench ------------------------------------------------------------------------------------

def ints_type(text: str) -> tuple[int, ...]:
  from kvjax.lm.bench import parse_ints
  try:
    return parse_ints(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def _add_bench(subparsers) -> None:
  p = subparsers.add_parser(
      "bench", help="decode and prefill speed on this device against its bandwidth bound",
      description="Times greedy decode steps (batch x context grid, every row running every "
      "step) and prefill (one prompt) of a model on this device, compilation excluded, and "
      "reports each decode cell against its memory-bandwidth bound: the bytes a step reads "
      "(weights + K/V at the mean context) over the bandwidth of a large array copy measured "
      "in the same run. Prompts are random token ids.")
  add_model_flag(p)
  p.add_argument("--dtype", choices=DTYPES, help="cast the params (default: as stored)")
  p.add_argument("--batches", type=ints_type, default=(1, 8), metavar="B,B",
                 help="decode batch sizes (default 1,8)")
  p.add_argument("--contexts", type=ints_type, default=(256, 1024), metavar="C,C",
                 help="decode context lengths (default 256,1024)")
  p.add_argument("--prefill", type=ints_type, default=(256, 1024), metavar="P,P",
                 help="prefill prompt lengths (default 256,1024)")
  p.add_argument("--new-tokens", type=positive, default=32, metavar="N",
                 help="decode steps timed per cell (default 32)")
  p.add_argument("--repeats", type=positive, default=3, metavar="R",
                 help="timed rounds (medians; default 3)")
  p.add_argument("--json", action="store_true", help="print the report as JSON")
  p.set_defaults(run=_bench, check=lambda args: None)


def _bench(args: argparse.Namespace) -> int:
  from kvjax.lm import bench
  model = _load(args)
  grid = bench.Grid(batches=args.batches, contexts=args.contexts, prefill=args.prefill,
                    new_tokens=args.new_tokens, repeats=args.repeats)
  grid.check(model)
  progress = None if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
  report = bench.run(model, grid, progress=progress)
  report["model"] = dict(name=args.model, dtype=str(model.dtype), n_params=model.cfg.n_params)
  if args.json:
    print(json.dumps(report))
  else:
    m = report["machine"]
    print(f"{args.model} ({model.cfg.n_params / 1e6:.1f}M params, {model.dtype}) on "
          f"{m['device_kind']} ({m['backend']}), jax {m['jax']}")
    print(bench.markdown(report), end="")
  return 0


# --- stream -----------------------------------------------------------------------------------

def _add_stream(subparsers) -> None:
  p = subparsers.add_parser(
      "stream", help="endless generation or a multi-turn chat in constant memory (StreamingLLM)",
      description="Generates with a fixed memory budget: --sinks attention sinks plus a rolling "
      "window of --window tokens, positions assigned inside the cache. With --prompt: one "
      "endless continuation (until a stop token, --max-new-tokens or Ctrl-C; tokens are evicted "
      "one by one). Without: a chat, one turn per stdin line, each reply at most "
      "--max-new-tokens (default 64); each turn first evicts enough old tokens for its prompt "
      "and reply. Text is printed as it comes.")
  add_model_flag(p)
  p.add_argument("--prompt", default=None, metavar="TEXT",
                 help="continue this text endlessly ('-' reads it from stdin); "
                 "without it, chat: one turn per line of stdin")
  p.add_argument("--sinks", type=nonneg, default=4, metavar="N",
                 help="attention sinks: the stream's first N tokens, kept for good (default 4)")
  p.add_argument("--window", type=checked(int, lambda v: v >= 1, "an integer >= 1 (the "
                                          "cache holds the sinks plus at least 1 recent token)"),
                 default=252, metavar="W", help="recent tokens kept (default 252: with 4 sinks, "
                 "the 256-token context the bundled models were trained on)")
  p.add_argument("--chunk", type=positive, default=None, metavar="C",
                 help="prompt tokens fed per step, at most --window (default min(W, 256))")
  p.add_argument("--max-new-tokens", type=positive, default=None, metavar="N",
                 help="tokens per reply at most (chat: default 64, at most --window; "
                 "--prompt: default unlimited)")
  _add_sampling(p)
  p.add_argument("--json", action="store_true",
                 help="print only one JSON object at the end: turns (prompt, text, finish), "
                 "tokens_generated, peak_cache_tokens, tokens_per_s, timings")
  p.set_defaults(run=_stream, check=lambda args: _check_stream(p, args))


def _check_stream(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  _check_sampling(parser, args)
  if args.chunk is not None and args.chunk > args.window:
    parser.error(f"--chunk {args.chunk} exceeds --window {args.window}: a prompt chunk must "
                 "fit the window")
  if args.prompt is None:
    if args.max_new_tokens is None:
      args.max_new_tokens = 64
    if args.max_new_tokens > args.window:
      parser.error(f"--max-new-tokens {args.max_new_tokens} exceeds --window {args.window}: in "
                   "a chat each reply must fit the window")


def _stream(args: argparse.Namespace) -> int:
  from kvjax.lm.streaming import Stream
  model = _load(args)
  sampling, key = _sampling(args)
  session = Stream(model, n_sink=args.sinks, window=args.window, chunk=args.chunk,
                   sampling=sampling, key=key)
  if args.prompt is not None:
    turns = iter(_read_prompts([args.prompt]))
  else:
    turns = _stdin_lines()
  record, code = [], 0
  try:
    for prompt in turns:
      done: dict = {}
      pieces = session.turn(prompt, max_new_tokens=args.max_new_tokens, stop=args.stop,
                            chat=args.chat, done=done)
      record.append({"prompt": prompt, "text": [], "finish": "interrupted"})
      for piece in pieces:
        record[-1]["text"].append(piece)
        if not args.json:
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
  for turn in record:
    turn["text"] = "".join(turn["text"])
  s = session.stats
  if args.json:
    print(json.dumps({
        "model": args.model, "sinks": args.sinks, "window": args.window, "turns": record,
        "tokens_generated": s["tokens_generated"], "prompt_tokens": s["prompt_tokens"],
        "peak_cache_tokens": s["peak_cache_tokens"], "tokens_per_s": _finite(s["tokens_per_s"]),
        "prefill_s": s["prefill_s"], "decode_s": s["decode_s"], "compile_s": s["compile_s"]}))
  else:
    print(f"{PROG}: {s['tokens_generated']} tokens generated in {s['decode_s']:.2f} s "
          f"({s['tokens_per_s']:.1f} tok/s) over {len(record)} turn(s); peak cache "
          f"{s['peak_cache_tokens']} tokens of {args.sinks} sinks + {args.window} window; "
          f"compile {s['compile_s']:.2f} s", file=sys.stderr)
  return code


def _stdin_lines():
  """Chat turns: stdin line by line (a prompt on stderr when it is a terminal)."""
  while True:
    if sys.stdin.isatty():
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
      return
    yield line.rstrip("\n")


# --- ppl --------------------------------------------------------------------------------------

def _add_ppl(subparsers) -> None:
  from kvjax.lm.streaming import MODES
  p = subparsers.add_parser(
      "ppl", help="streaming perplexity of a long text (StreamingLLM)",
      description="Feeds a text token by token and reports its perplexity under a cache "
      "policy: dense (everything kept), window (rolling window, no sinks), sink (attention "
      "sinks + rolling window), recompute (the last W tokens recomputed for every token).")
  add_model_flag(p)
  p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file ('-' = stdin)")
  p.add_argument("--cache", choices=MODES, default=None, help="cache policy (default sink)")
  p.add_argument("--sinks", type=nonneg,
                 default=None, metavar="N", help="attention sinks (--cache sink; default 4)")
  p.add_argument("--window", type=positive,
                 default=None, metavar="W",
                 help="recent tokens kept (window, sink) or recomputed (recompute)")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="cast the params to this dtype (default: as stored)")
  g = p.add_argument_group(
      "cache augmentation: perplexity of the 1st .. A-th token after augmentation points, with "
      "and without the coprocessor's latents (instead of a streaming run)")
  g.add_argument("--coprocessor", metavar="DIR_OR_NAME", default=None,
                 help="coprocessor directory or shipped name (e.g. shakespeare-16)")
  g.add_argument("--ahead", type=positive, default=32, metavar="A",
                 help="positions after each point to score (default 32)")
  g.add_argument("--points", type=positive, default=16, metavar="M",
                 help="augmentation points per window, spread evenly (default 16)")
  g.add_argument("--seq-len", type=checked(int, lambda v: v >= 2, "an integer >= 2"),
                 default=256, metavar="T", help="the text is cut into windows of T tokens "
                 "(default 256); points read only their own window")
  g.add_argument("--delay", type=nonneg, default=0, metavar="K",
                 help="insert the latents K tokens after their point (default 0)")
  g.add_argument("--batch-size", type=positive, default=8, metavar="B",
                 help="windows per forward (default 8)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object: ppl, tokens, peak_cache_tokens, ms_per_token "
                      "(with --coprocessor: ppl_base_by_position, ppl_aug_by_position, "
                      "relative_reduction_by_position, ...)")
  p.set_defaults(run=_ppl, check=lambda args: _check_ppl(p, args))


def _check_ppl(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.text != "-" and not os.path.isfile(args.text):
    parser.error(f"--text {args.text}: no such file")
  if args.coprocessor is not None:
    given = [f"--{f}" for f in ("cache", "sinks", "window") if getattr(args, f) is not None]
    if given:
      parser.error(f"{', '.join(given)}: streaming-cache flags do not apply with --coprocessor")
    from kvjax.coprocessor.model import resolve as resolve_cop
    try:
      resolve_cop(args.coprocessor)
    except FileNotFoundError as err:
      parser.error(f"--coprocessor: {err}")
    from kvjax.train.coprocessor import room_error
    error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
    if error:
      parser.error(error)
    return
  changed = [f"--{f.replace('_', '-')}" for f, d in (("ahead", 32), ("points", 16),
                                                    ("seq_len", 256), ("delay", 0),
                                                    ("batch_size", 8)) if getattr(args, f) != d]
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
  if args.text == "-":
    text = sys.stdin.read()
  else:
    with open(args.text, encoding="utf-8") as f:
      text = f.read()
  model = _load(args)
  if model.tokenizer is None:
    raise ValueError(f"{args.model} has no tokenizer.json to encode the text with")
  ids = model.tokenizer.encode(text)
  if args.coprocessor is not None:
    return _ppl_augmented(args, model, ids)
  got = perplexity(model, ids, cache=args.cache, n_sink=args.sinks, window=args.window,
                   progress=not args.no_progress and not args.json)
  n_sink = (4 if args.sinks is None else args.sinks) if args.cache == "sink" else 0
  out = {"model": args.model, "cache": args.cache, "sinks": n_sink, "window": args.window,
         "ppl": got.ppl, "tokens": got.tokens, "peak_cache_tokens": got.peak_cache_tokens,
         "ms_per_token": got.ms_per_token}
  if args.json:
    print(json.dumps(out))
  else:
    print(f"ppl {got.ppl:.3f} over {got.tokens:,} tokens ({args.cache}, peak cache "
          f"{got.peak_cache_tokens:,} tokens, {got.ms_per_token:.2f} ms/token)")
  return 0


def _ppl_augmented(args: argparse.Namespace, model, ids: list[int]) -> int:
  """`kvjax ppl --coprocessor`: perplexity by position after augmentation points."""
  import numpy as np

  from kvjax import coprocessor
  from kvjax.train.coprocessor import by_position
  cop = coprocessor.load(args.coprocessor, model)
  T = args.seq_len
  if len(ids) < 2:
    raise ValueError("the text has fewer than 2 tokens")
  n = -(-(len(ids) - 1) // T)  # windows of T targets; consecutive windows share one token
  windows = np.full((n, T + 1), -1, np.int64)
  for r in range(n):
    w = ids[r * T:r * T + T + 1]
    windows[r, :len(w)] = w
  got = by_position(model, cop, windows, ahead=args.ahead, points=args.points,
                    delay=args.delay, batch_size=args.batch_size,
                    progress=not args.no_progress and not args.json)
  out = {"model": args.model, "coprocessor": args.coprocessor, "latents": cop.n_latents,
         "kind": cop.cc.kind, "delay": args.delay, "seq_len": T, "tokens": len(ids),
         "windows": n, **got.to_json()}
  if args.json:
    print(json.dumps(out))
    return 0
  red = got.relative_reduction
  print(f"{args.coprocessor} ({cop.n_latents} latents) on {len(ids):,} tokens, {got.points:,} "
        f"points, delay {args.delay}:")
  print("position  ppl base  ppl aug  reduction")
  for a in sorted({0, 1, 3, 7, 15, 31, args.ahead - 1} & set(range(args.ahead))):
    print(f"{a + 1:8d}  {got.ppl_base[a]:8.3f}  {got.ppl_aug[a]:7.3f}  {100 * red[a]:+8.2f}%")
  print(f"all {args.ahead}: loss {got.loss_base:.4f} -> {got.loss_aug:.4f} nats "
        f"(perplexity reduction {100 * out['relative_reduction_all']:+.2f}%)")
  return 0


# --- train ------------------------------------------------------------------------------------

def _add_train(subparsers) -> None:
  """`kvjax train TASK ...`: listed here for --help; `main` forwards it to kvjax.train.cli."""
  p = subparsers.add_parser("train", add_help=False, help="train a model (kvjax train lm --help)",
                            description="Same as python -m kvjax.train.")
  p.add_argument("argv", nargs=argparse.REMAINDER)

  def run(args: argparse.Namespace) -> int:
    from kvjax.train.cli import main as train_main
    return train_main(args.argv, prog=f"{PROG} train")

  p.set_defaults(run=run, check=lambda args: None)


# --- generate ---------------------------------------------------------------------------------

def _add_generate(subparsers) -> None:
  p = subparsers.add_parser(
      "generate", help="continue one or more prompts",
      description="Generates a continuation of each prompt (several --prompt flags run as one "
      "batch). Greedy unless --temperature > 0. One prompt streams its text as it is produced.")
  p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR_OR_NAME",
                 help="Hugging Face format model directory (config.json, model.safetensors, "
                 "tokenizer.json) or a bundled model name: "
                 f"{', '.join(bundled()) or 'none installed'} (default {DEFAULT_MODEL})")
  p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                 help="prompt text; repeat for a batch; '-' reads it from stdin")
  p.add_argument("--max-new-tokens", type=positive, default=64, metavar="N",
                 help="tokens to generate per prompt at most (default 64)")
  _add_sampling(p)
  g = p.add_argument_group("speculative decoding (EAGLE; output as without it)")
  g.add_argument("--speculative", choices=("eagle",), default=None,
                 help="draft with an EAGLE head and verify a draft tree per target forward")
  g.add_argument("--head", metavar="DIR_OR_NAME",
                 help="EAGLE head directory (head.json + params/) or shipped head name "
                      "(e.g. shakespeare)")
  g.add_argument("--tree-top-k", type=positive, default=None, metavar="K",
                 help="children per expanded node, nodes expanded per level (default 8; "
                      "1 = chain drafting)")
  g.add_argument("--tree-depth", type=positive, default=None, metavar="D",
                 help="draft levels, the longest accepted run per forward minus one (default 5)")
  g.add_argument("--tree-tokens", type=tree_tokens_type, default=None, metavar="N",
                 help="tree size verified per target forward, root included (default 32); "
                      "'auto' times sizes 8..64 on this machine first and takes the fastest")
  g = p.add_argument_group("cache augmentation (a trained coprocessor writes latents into the "
                            "cache before the prompt's last token)")
  g.add_argument("--coprocessor", metavar="DIR_OR_NAME", default=None,
                 help="coprocessor directory (coprocessor.json + params/) or shipped name "
                      "(e.g. shakespeare-16)")
  g.add_argument("--delay", type=nonneg, default=None, metavar="K",
                 help="the latents arrive K tokens late (asynchronous augmentation; default 0)")
  p.add_argument("--json", action="store_true",
                 help="print one JSON object (texts, token ids, timings) instead of text")
  p.set_defaults(run=_generate, check=lambda args: _check_generate(p, args))


def tree_tokens_type(text: str):
  """--tree-tokens: an int >= 2 or 'auto'."""
  if text == "auto":
    return text
  return checked(int, lambda v: v >= 2, "an integer >= 2 or 'auto'")(text)


def _add_sampling(p: argparse.ArgumentParser) -> None:
  """Sampling, stop, chat-template and dtype flags shared by generate and stream."""
  p.add_argument("--temperature", type=temperature_type, default=0.0, metavar="T",
                 help="sampling temperature; 0 (default) is greedy decoding")
  p.add_argument("--top-k", type=top_k_type, default=None, metavar="K",
                 help="sample from the K most likely tokens (needs --temperature > 0)")
  p.add_argument("--top-p", type=top_p_type, default=None, metavar="P",
                 help="nucleus sampling mass in (0, 1] (needs --temperature > 0)")
  p.add_argument("--seed", type=int, default=0, metavar="S",
                 help="PRNG seed for sampling (default 0)")
  p.add_argument("--stop", action="append", default=[], metavar="STR",
                 help="stop a reply when its text contains STR (cut before it); repeatable")
  p.add_argument("--chat", action="store_true",
                 help="wrap each prompt as a user message with the model's chat template")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="cast the params to this dtype (default: as stored)")


def _check_sampling(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.temperature == 0:
    given = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
    if given:
      verb = "applies" if len(given) == 1 else "apply"
      parser.error(f"{' and '.join(given)} only {verb} when sampling: sampling flags need "
                   "--temperature > 0 (the default 0 is greedy decoding)")
  if any(not s for s in args.stop):
    parser.error("--stop expects a non-empty string")


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Cross-flag rules that argparse types cannot express."""
  _check_sampling(parser, args)
  if args.prompt.count("-") > 1:
    parser.error("--prompt - (read stdin) can be given only once")
  tree_flags = [f for f in ("tree_top_k", "tree_depth", "tree_tokens")
                if getattr(args, f) is not None]
  if args.speculative is None and (args.head or tree_flags):
    given = ["--head"] * bool(args.head) + ["--" + f.replace("_", "-") for f in tree_flags]
    parser.error(f"{', '.join(given)} only apply with --speculative eagle")
  if args.delay is not None and args.coprocessor is None:
    parser.error("--delay applies only with --coprocessor")
  if args.coprocessor is not None and args.speculative:
    parser.error("--coprocessor and --speculative do not combine (the EAGLE head drafts from "
                 "an unaugmented cache)")
  if args.coprocessor is not None:
    from kvjax.coprocessor.model import resolve as resolve_cop
    try:
      resolve_cop(args.coprocessor)
    except FileNotFoundError as err:
      parser.error(f"--coprocessor: {err}")
    if (args.delay or 0) >= args.max_new_tokens:
      parser.error(f"--delay {args.delay} must be smaller than --max-new-tokens "
                   f"{args.max_new_tokens}")
  if args.speculative and not args.head:
    parser.error("--speculative eagle needs --head DIR_OR_NAME (an EAGLE head trained for "
                 "the model)")
  if args.speculative:
    from kvjax.speculative.tree import TreeSpec
    given = {f[5:] if f != "tree_tokens" else "total_tokens": getattr(args, f)
             for f in tree_flags if getattr(args, f) != "auto"}
    try:
      args.tree = TreeSpec(**given)
    except ValueError as err:
      parser.error(str(err).replace("tree top_k", "--tree-top-k").replace(
          "tree depth", "--tree-depth").replace("tree total_tokens", "--tree-tokens"))


def _read_prompts(prompts: list[str]) -> list[str]:
  """Replaces a '-' prompt by stdin (one trailing newline removed)."""
  out = []
  for p in prompts:
    if p == "-":
      p = sys.stdin.read()
      p = p[:-1] if p.endswith("\n") else p
    out.append(p)
  return out


def _load(args: argparse.Namespace):
  """The model named by --model, cast to --dtype."""
  import jax.numpy as jnp

  from kvjax.lm.model import load
  return load(args.model, dtype=None if args.dtype is None else getattr(jnp, args.dtype))


def _sampling(args: argparse.Namespace) -> tuple:
  """(Sampling, PRNG key or None) from the sampling flags."""
  import jax

  from kvjax.lm.sampling import Sampling
  sampling = Sampling(temperature=args.temperature, top_k=args.top_k or 0,
                      top_p=1.0 if args.top_p is None else args.top_p)
  return sampling, None if sampling.greedy else jax.random.key(args.seed)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
  """Keyword arguments shared by `lm.generate` and `lm.stream`."""
  sampling, key = _sampling(args)
  return dict(max_new_tokens=args.max_new_tokens, sampling=sampling, key=key,
              stop=tuple(args.stop), chat=args.chat)


def _generate(args: argparse.Namespace) -> int:
  prompts = _read_prompts(args.prompt)
  model = _load(args)
  kwargs = _sampling_kwargs(args)
  if args.speculative:
    from kvjax import speculative
    head = speculative.load_head(args.head, model)
    if args.tree_tokens == "auto":
      log = lambda msg: print(f"{PROG}: {msg}", file=sys.stderr)
      args.tree, _ = speculative.auto_tree(model, head, prompts, top_k=args.tree.top_k,
                                           depth=args.tree.depth, log=log)
      log(f"auto: --tree-tokens {args.tree.total_tokens}")
    out = speculative.generate(model, head, prompts, tree=args.tree, **kwargs)
  elif args.coprocessor is not None:
    from kvjax import coprocessor
    from kvjax.lm.generate import generate
    cop = coprocessor.load(args.coprocessor, model)
    out = generate(model, prompts, coprocessor=cop, delay=args.delay or 0, **kwargs)
  elif len(prompts) == 1 and not args.json:
    return _stream_one(model, prompts[0], kwargs)
  else:
    from kvjax.lm.generate import generate
    out = generate(model, prompts, **kwargs)
  if args.json:
    print(json.dumps(_generation_json(args, model, out, kwargs["sampling"])))
    return 0
  for i, (prompt, text) in enumerate(zip(prompts, out.texts)):
    if i:
      print()
    print(f"=== [{i + 1}/{len(prompts)}] {_preview(prompt)} ===")
    print(text)
  s = out.stats
  print(f"{PROG}: {len(prompts)} prompts, {s['prompt_tokens']} prompt tokens, "
        f"prefill {s['prefill_s']:.3f} s; {s['new_tokens']} new tokens in {s['decode_s']:.3f} s "
        f"({s['decode_tokens_per_s']:.1f} tok/s); compile {s['compile_s']:.2f} s"
        + (f"; {s['mean_accept_len']:.2f} tokens per target forward ({s['target_forwards']} "
           "forwards)" if args.speculative else ""), file=sys.stderr)
  return 0


def _preview(prompt: str, width: int = 60) -> str:
  """A prompt shortened to one header-line-sized repr."""
  text = repr(prompt)
  return text if len(text) <= width else text[:width - 3] + "..."


def _stream_one(model, prompt: str, kwargs: dict) -> int:
  """Writes the continuation to stdout as it is produced, then a newline; timings to stderr."""
  from kvjax.lm.generate import stream
  stats: dict = {}
  for piece in stream(model, prompt, stats=stats, **kwargs):
    sys.stdout.write(piece)
    sys.stdout.flush()
  sys.stdout.write("\n")
  sys.stdout.flush()
  print(f"{PROG}: {stats['prompt_tokens']} prompt tokens, prefill {stats['prefill_s']:.3f} s; "
        f"{stats['new_tokens']} new tokens in {stats['decode_s']:.3f} s "
        f"({stats['decode_tokens_per_s']:.1f} tok/s, {stats['finish']}); "
        f"compile {stats['compile_s']:.2f} s", file=sys.stderr)
  return 0


def _finite(x: float) -> float | None:
  """JSON has no NaN/inf: those become null."""
  return float(x) if math.isfinite(x) else None


def _generation_json(args: argparse.Namespace, model, out, sampling) -> dict:
  """The --json object of `kvjax generate`."""
  s = out.stats
  return {
      "model": args.model,
      "dtype": str(model.dtype),
      "text": out.texts,
      "tokens": out.tokens,
      "prompt_tokens": out.prompt_tokens,
      "finish": out.finish,
      "prefill_s": _finite(s["prefill_s"]),
      "decode_s": _finite(s["decode_s"]),
      "compile_s": _finite(s["compile_s"]),
      "decode_tokens_per_s": _finite(s["decode_tokens_per_s"]),
      "new_tokens": int(s["new_tokens"]),
      "max_new_tokens": args.max_new_tokens,
      "temperature": sampling.temperature,
      "top_k": sampling.top_k,
      "top_p": sampling.top_p,
      "seed": None if sampling.greedy else args.seed,
      "stop": list(args.stop),
      "chat": args.chat,
  } | ({} if not args.speculative else {
      "speculative": args.speculative,
      "head": args.head,
      "tree": {"top_k": args.tree.top_k, "depth": args.tree.depth,
               "total_tokens": args.tree.total_tokens},
      "mean_accept_len": _finite(s["mean_accept_len"]),
      "target_forwards": int(s["target_forwards"]),
  }) | ({} if args.coprocessor is None else {
      "coprocessor": args.coprocessor,
      "delay": args.delay or 0,
  })


if __name__ == "__main__":
  sys.exit(main())
