"""What every kvjax command line shares: argparse types that check their domain, the model,
dtype and sampling flags, reading prompts, and `run`, which turns the library's errors into one
line and an exit status."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import ConfigError
from kvjax.lm.tokenizer import TokenizerError

PROG = "kvjax"
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
temperature_type = checked(float, lambda t: t == 0 or 1e-6 <= t < float("inf"),
                           "0 (greedy decoding) or a finite number >= 1e-6")
top_k_type = checked(int, lambda k: k >= 0, "an integer >= 0 (0 = off)")
top_p_type = checked(float, lambda p: 0 < p <= 1, "a number in (0, 1] (1 = off)")


def add_model_flag(p: argparse.ArgumentParser) -> None:
  """--model DIR_OR_NAME, default the bundled DEFAULT_MODEL (every subcommand that loads one)."""
  p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR_OR_NAME",
                 help=f"model directory or bundled model name (default {DEFAULT_MODEL})")
  add_finite_flag(p)


def add_finite_flag(p: argparse.ArgumentParser) -> None:
  """--no-check-finite: load without checking every weight for NaN / Inf."""
  p.add_argument("--no-check-finite", dest="check_finite", action="store_false",
                 help="skip the check that every weight is finite (for huge checkpoints)")


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
  except KeyboardInterrupt as err:  # a message (e.g. training's: where to resume) or none
    print(f"\n{label(args)}: {err}" if str(err) else "", file=sys.stderr)
    return 130


def ints_type(text: str) -> tuple[int, ...]:
  from kvjax.lm.bench import parse_ints
  try:
    return parse_ints(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
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
                 help="cast the params to this dtype (default: as stored; float32 for the bundled "
                 "models, which are stored in bfloat16)")


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.temperature == 0:
    given = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
    if given:
      verb = "applies" if len(given) == 1 else "apply"
      parser.error(f"{' and '.join(given)} only {verb} when sampling: sampling flags need "
                   "--temperature > 0 (the default 0 is greedy decoding)")
  if any(not s for s in args.stop):
    parser.error("--stop expects a non-empty string")


def read_prompts(prompts: list[str]) -> list[str]:
  """Replaces a '-' prompt by stdin (one trailing newline removed)."""
  out = []
  for p in prompts:
    if p == "-":
      p = sys.stdin.read()
      p = p[:-1] if p.endswith("\n") else p
    out.append(p)
  return out


def load_model(args: argparse.Namespace):
  """The model named by --model, cast to --dtype (its weights checked finite unless
  --no-check-finite)."""
  import jax.numpy as jnp

  from kvjax.lm.model import load
  return load(args.model, dtype=None if args.dtype is None else getattr(jnp, args.dtype),
              check_finite=getattr(args, "check_finite", True))


def sampling_from_flags(args: argparse.Namespace) -> tuple:
  """(Sampling, PRNG key or None) from the sampling flags."""
  import jax

  from kvjax.lm.sampling import Sampling
  sampling = Sampling(temperature=args.temperature, top_k=args.top_k or 0,
                      top_p=1.0 if args.top_p is None else args.top_p)
  return sampling, None if sampling.greedy else jax.random.key(args.seed)


def sampling_kwargs(args: argparse.Namespace) -> dict:
  """Keyword arguments shared by `lm.generate` and `lm.stream`."""
  sampling, key = sampling_from_flags(args)
  return dict(max_new_tokens=args.max_new_tokens, sampling=sampling, key=key,
              stop=tuple(args.stop), chat=args.chat)


def finite(x: float) -> float | None:
  """JSON has no NaN/inf: those become null."""
  return float(x) if math.isfinite(x) else None


def stdin_lines():
  """Chat turns: stdin line by line (a prompt on stderr when it is a terminal)."""
  while True:
    if sys.stdin.isatty():
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
      return
    yield line.rstrip("\n")


def read_text(path: str) -> str:
  """The UTF-8 text of a --text file ("-" = stdin); ValueError naming the file otherwise."""
  try:
    if path == "-":
      return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as err:
    raise ValueError(f"--text {path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
  except OSError as err:
    raise ValueError(f"--text {path}: {err.strerror}") from None


def model_and_text(args: argparse.Namespace):
  """(the --model, cast to --dtype, and the token ids of the --text file it encodes)."""
  text = read_text(args.text)
  model = load_model(args)
  if model.tokenizer is None:
    raise ValueError(f"{args.model} has no tokenizer.json to encode the text with")
  return model, model.tokenizer.encode(text)
