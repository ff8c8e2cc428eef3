"""What every kvjax command line shares: argparse types that check their domain, the model,
dtype and sampling flags, reading prompts and text as strict UTF-8, checking input and output
paths before the work starts, and `run`, which turns every error of bad input (the library's,
the operating system's, undecodable text, a broken chat template) into one line and an exit
status."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import warnings
from collections.abc import Callable

import jinja2

from kvjax.lm.checkpoint import CheckpointError
from kvjax.lm.config import ConfigError
from kvjax.lm.engine import NonFiniteError
from kvjax.lm.tokenizer import TokenizerError

PROG = "kvjax"
# What `run` reports as one line (ValueError covers every kvjax error class and undecodable
# text; OSError missing, unreadable or unwritable files and sockets); anything else is a bug.
LIBRARY_ERRORS = (
  ConfigError,
  CheckpointError,
  TokenizerError,
  ValueError,
  OSError,
  OverflowError,
  jinja2.TemplateError,
  NonFiniteError,
)
DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL = "shakespeare"  # bundled (see MODELS.md)
INT_LIMIT = 2**31 - 1  # integer flags above it overflow the int32 arrays they size


class Parser(argparse.ArgumentParser):
  """argparse whose errors are one line, `PROG: error: MESSAGE`, exit status 2 (the usage is
  in --help). Subparsers inherit it."""

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: str) -> str:
  """message with its line breaks (and the indentation after them) folded into spaces."""
  return re.sub(r"\s*\n\s*", " ", str(message).strip())


def checked(
  kind: type, ok: Callable[[float], bool], expected: str, limit: int | None = INT_LIMIT
) -> Callable[[str], float]:
  """An argparse `type` that parses `kind` and rejects values failing `ok` (and non-finite
  floats, and ints beyond +-limit) with `expected`. Shared by every kvjax command line."""

  def parse(text: str):
    try:
      value = kind(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
    if not ok(value) or (kind is float and not math.isfinite(value)):
      raise argparse.ArgumentTypeError(f"expected {expected}; got {text}")
    if kind is int and limit is not None and abs(value) > limit:
      raise argparse.ArgumentTypeError(f"expected {expected}, at most {limit}; got {text}")
    return value

  parse.__name__ = kind.__name__  # argparse names the type in some messages
  return parse


positive = checked(int, lambda v: v >= 1, "an integer >= 1")
nonneg = checked(int, lambda v: v >= 0, "an integer >= 0")
temperature_type = checked(
  float,
  lambda t: t == 0 or 1e-6 <= t < float("inf"),
  "0 (greedy decoding) or a finite number >= 1e-6",
)
top_k_type = checked(int, lambda k: k >= 0, "an integer >= 0 (0 = off)")
top_p_type = checked(float, lambda p: 0 < p <= 1, "a number in (0, 1] (1 = off)")
# jax.random.key(seed) keeps the low 32 bits (2**32 is seed 0 again) and overflows at 2**63
seed_type = checked(int, lambda s: 0 <= s < 2**32, "an integer in [0, 2**32)", limit=None)
port_type = checked(int, lambda v: 0 <= v <= 65535, "a TCP port in [0, 65535]")


def text_type(text: str) -> str:
  """An argparse `type` for text that reaches the tokenizer: refuses command-line bytes that
  are not UTF-8 (Python hands them over as surrogate escapes, '\\udcff' for 0xff)."""
  bad = not_unicode(text)
  if bad:
    raise argparse.ArgumentTypeError(f"not UTF-8 text ({bad})")
  return text


def not_unicode(text: str) -> str | None:
  """None for text that encodes as UTF-8, else what is wrong with it: the first byte that was
  not UTF-8 (a surrogate escape) or a lone surrogate, and where."""
  try:
    text.encode("utf-8")
    return None
  except UnicodeEncodeError as err:
    c = ord(text[err.start])
    if 0xDC80 <= c <= 0xDCFF:
      return f"undecodable byte 0x{c - 0xDC00:02x} at character {err.start}"
    return f"lone surrogate U+{c:04X} at character {err.start}"


def decode(data: bytes | str, what: str) -> str:
  """data as text: bytes decoded as strict UTF-8, a str refused if it holds undecoded bytes
  (surrogate escapes); ValueError naming `what` (e.g. "--text FILE") otherwise."""
  if isinstance(data, bytes):
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError as err:
      raise ValueError(f"{what}: not UTF-8 text ({utf8_error(err)})") from None
  bad = not_unicode(data)
  if bad:
    raise ValueError(f"{what}: not UTF-8 text ({bad})")
  return data


def utf8_error(err: UnicodeDecodeError) -> str:
  """Where and why bytes failed to decode, e.g. "invalid start byte 0xff at byte 2"."""
  return f"{err.reason} 0x{err.object[err.start]:02x} at byte {err.start}"


def read_stdin(what: str) -> str:
  """All of stdin as strict UTF-8 text (read as bytes when it has them); ValueError naming
  `what` otherwise."""
  if sys.stdin is None:
    raise ValueError(f"{what}: there is no standard input")
  stream = getattr(sys.stdin, "buffer", sys.stdin)
  return decode(stream.read(), what)


def add_model_flag(p: argparse.ArgumentParser) -> None:
  """--model DIR_OR_NAME, default the bundled DEFAULT_MODEL (every subcommand that loads one)."""
  p.add_argument(
    "--model",
    default=DEFAULT_MODEL,
    metavar="DIR_OR_NAME",
    help=f"model directory or bundled model name (default {DEFAULT_MODEL})",
  )
  add_finite_flag(p)


def add_finite_flag(p: argparse.ArgumentParser) -> None:
  """--no-check-finite: load without checking every weight for NaN / Inf."""
  p.add_argument(
    "--no-check-finite",
    dest="check_finite",
    action="store_false",
    help="skip the check that every weight is finite (for huge checkpoints)",
  )


def run(parser: argparse.ArgumentParser, argv: list[str] | None, label) -> int:
  """Parses argv, runs the chosen subcommand. Bad flags give 2 (argparse's one-line message, or
  `check`'s), --help 0; an error of bad input while checking or running (the library's
  ValueErrors, OSErrors, undecodable text, a chat template that fails) prints one line,
  `label(args): error: ...`, and gives 1 (a warning prints `label(args): warning: ...`); Ctrl-C 130; a closed stdout (`| head`) 141, silently.
  Any other exception is a bug and keeps its traceback."""
  try:
    args = parser.parse_args(argv)
  except SystemExit as done:  # argparse's error() (2) and --help (0)
    return done.code or 0
  try:
    with warnings.catch_warnings():  # a warning is one line too: `kvjax: warning: ...`
      warnings.showwarning = lambda message, *_: print(
        f"{label(args)}: warning: {one_line(message)}", file=sys.stderr
      )
      args.check(args)
      return args.run(args)
  except SystemExit as done:  # a check's parser.error
    return done.code or 0
  except KeyboardInterrupt as err:  # a message (e.g. training's: where to resume) or none
    print(f"\n{label(args)}: {err}" if str(err) else "", file=sys.stderr)
    return 130
  except BrokenPipeError:
    _quiet_stdout()
    return 141
  except LIBRARY_ERRORS as err:
    print(f"{label(args)}: error: {one_line(describe(err, args, parser))}", file=sys.stderr)
    return 1


def describe(
  err: BaseException,
  args: argparse.Namespace | None = None,
  parser: argparse.ArgumentParser | None = None,
) -> str:
  """The one-line message for an error `run` reports: what failed, on which file, port, flag
  or model, and what was expected."""
  if isinstance(err, UnicodeDecodeError):  # a source that did not name itself (see decode)
    return f"input is not UTF-8 text ({utf8_error(err)})"
  if isinstance(err, UnicodeEncodeError):
    what = err.object[err.start : err.end]
    msg = f"cannot encode {what!r} as {err.encoding} ({err.reason})"
    out = getattr(sys.stdout, "encoding", None) or ""
    if out.lower().replace("-", "") != "utf8":
      msg += f"; stdout's encoding is {out or 'unknown'}: set PYTHONIOENCODING=utf-8"
    return msg
  if isinstance(err, jinja2.TemplateError):
    model = next(
      (
        getattr(args, a)
        for a in ("model", "receiver", "target", "base")
        if isinstance(getattr(args, a, None), str)
      ),
      "the model",
    )
    where = f" (line {err.lineno})" if getattr(err, "lineno", None) else ""
    return f"the chat template of {model} failed{where}: {err.message or type(err).__name__}"
  if isinstance(err, OSError):
    return os_message(err, args, parser)
  if isinstance(err, OverflowError):
    return f"a number is out of range ({err})"
  return str(err)


def os_message(
  err: OSError,
  args: argparse.Namespace | None = None,
  parser: argparse.ArgumentParser | None = None,
) -> str:
  """`[--flag] PATH: what is wrong` for an OSError on a file (the flag whose path holds it,
  when args has one), its own message otherwise (a socket's names its host and port)."""
  what = err.strerror or str(err) or type(err).__name__
  if err.filename is None:
    return what
  path = os.fsdecode(err.filename)
  if err.filename2 is not None:
    path += f" -> {os.fsdecode(err.filename2)}"
  flag = flag_of_path(args, parser, os.fsdecode(err.filename))
  return f"{flag + ' ' if flag else ''}{path}: {what}"


def flag_of_path(args, parser, path: str) -> str | None:
  """The flag of args whose path is `path` ("--text") or the nearest directory above it
  ("--out DIR:"), or None."""
  if args is None or parser is None:
    return None
  options = _options(parser)
  target = os.path.abspath(path)
  best = None
  for dest, value in vars(args).items():
    if dest not in options or not isinstance(value, str) or value in ("", "-"):
      continue
    given = os.path.abspath(value)
    if target == given:
      return options[dest]
    if target.startswith(given.rstrip(os.sep) + os.sep) and (
      best is None or len(given) > len(os.path.abspath(best[1]))
    ):
      best = options[dest], value
  return None if best is None else f"{best[0]} {best[1]}:"


def _options(parser: argparse.ArgumentParser) -> dict[str, str]:
  """dest -> its longest option string (--prompt-file, not -f), over the parser and every
  subparser."""
  out: dict[str, str] = {}
  todo = [parser]
  while todo:
    p = todo.pop()
    for action in p._actions:
      if isinstance(action, argparse._SubParsersAction):
        todo.extend(action.choices.values())
      elif action.option_strings:
        out.setdefault(action.dest, max(action.option_strings, key=len))
  return out


def _quiet_stdout() -> None:
  """Points stdout at /dev/null so that the interpreter's final flush into a closed pipe
  stays silent."""
  try:
    fd = os.open(os.devnull, os.O_WRONLY)
    os.dup2(fd, sys.stdout.fileno())
  except (OSError, ValueError, AttributeError):  # stdout is no file (tests capture it)
    pass


def check_input_file(parser: argparse.ArgumentParser, flag: str, path: str | None) -> None:
  """parser.error unless path ('-' = stdin passes) is an existing, readable regular file."""
  if path is None or path == "-":
    return
  if not os.path.exists(path):
    parser.error(f"{flag} {path}: no such file")
  if os.path.isdir(path):
    parser.error(f"{flag} {path}: is a directory; expected a file")
  if not os.access(path, os.R_OK):
    parser.error(f"{flag} {path}: not readable (permission denied)")


def check_output(
  parser: argparse.ArgumentParser, flag: str, path: str | None, *, directory: bool
) -> None:
  """parser.error unless path (a file, or with directory=True a directory) can be written: it
  is of that kind or absent, and the directory it is or goes into is writable. Checked before
  the work starts, so that a long run does not end on a path it cannot write."""
  if path is None:
    return
  wrong = output_error(path, directory=directory)
  if wrong:
    parser.error(f"{flag} {path}: {wrong}")


def output_error(path: str, *, directory: bool) -> str | None:
  """What stops writing path (see check_output), or None."""
  if os.path.exists(path):
    if directory and not os.path.isdir(path):
      return "exists and is not a directory"
    if not directory and os.path.isdir(path):
      return "is a directory; expected a file path"
    if not os.access(path, os.W_OK | (os.X_OK if directory else 0)):
      return "not writable (permission denied)"
    return None
  above = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(above):
    above = os.path.dirname(above)
  if not os.path.isdir(above):
    return f"{above} is not a directory"
  if not os.access(above, os.W_OK | os.X_OK):
    return f"cannot create it: {above} is not writable"
  return None


def ints_type(text: str) -> tuple[int, ...]:
  from kvjax.lm.bench import parse_ints

  try:
    values = parse_ints(text)
  except ValueError as err:
    raise argparse.ArgumentTypeError(str(err)) from None
  if any(abs(v) > INT_LIMIT for v in values):
    raise argparse.ArgumentTypeError(f"expected integers of at most {INT_LIMIT}; got {text}")
  return values


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
  """Sampling, stop, chat-template and dtype flags shared by generate and stream."""
  p.add_argument(
    "--temperature",
    type=temperature_type,
    default=0.0,
    metavar="T",
    help="sampling temperature; 0 (default) is greedy decoding",
  )
  p.add_argument(
    "--top-k",
    type=top_k_type,
    default=None,
    metavar="K",
    help="sample from the K most likely tokens (needs --temperature > 0)",
  )
  p.add_argument(
    "--top-p",
    type=top_p_type,
    default=None,
    metavar="P",
    help="nucleus sampling mass in (0, 1] (needs --temperature > 0)",
  )
  p.add_argument(
    "--seed",
    type=seed_type,
    default=0,
    metavar="S",
    help="PRNG seed for sampling, in [0, 2**32) (default 0)",
  )
  p.add_argument(
    "--stop",
    action="append",
    type=text_type,
    default=[],
    metavar="STR",
    help="stop a reply when its text contains STR (cut before it); repeatable",
  )
  p.add_argument(
    "--chat",
    action="store_true",
    help="wrap each prompt as a user message with the model's chat template",
  )
  p.add_argument(
    "--dtype",
    choices=DTYPES,
    default=None,
    help="cast the params to this dtype (default: as stored; float32 for the bundled "
    "models, which are stored in bfloat16)",
  )


def check_sampling_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  if args.temperature == 0:
    given = [f for f, v in (("--top-k", args.top_k), ("--top-p", args.top_p)) if v is not None]
    if given:
      verb = "applies" if len(given) == 1 else "apply"
      parser.error(
        f"{' and '.join(given)} only {verb} when sampling: sampling flags need "
        "--temperature > 0 (the default 0 is greedy decoding)"
      )
  if any(not s for s in args.stop):
    parser.error("--stop expects a non-empty string")


def read_prompts(prompts: list[str], flag: str = "--prompt") -> list[str]:
  """Replaces a '-' prompt by stdin (strict UTF-8, one trailing newline removed); ValueError
  naming `flag` for undecodable text."""
  out = []
  for p in prompts:
    if p == "-":
      p = read_stdin(f"{flag} - (stdin)")
      p = p[:-1] if p.endswith("\n") else p
    else:
      p = decode(p, flag)  # argv text is checked by text_type; this covers library callers
    out.append(p)
  return out


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
  """--coordinator, --num-processes, --process-id: one process per host on one mesh
  (`kvjax.lm.distributed.initialize`; unset flags read JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID)."""
  g = p.add_argument_group(
    "several hosts (jax.distributed; every process runs the same "
    "command; process 0 prints and writes)"
  )
  g.add_argument(
    "--coordinator",
    metavar="HOST:PORT",
    default=None,
    help="address of process 0 (default $JAX_COORDINATOR_ADDRESS)",
  )
  g.add_argument(
    "--num-processes",
    type=positive,
    default=None,
    metavar="N",
    help="processes in the run (default $JAX_NUM_PROCESSES)",
  )
  g.add_argument(
    "--process-id",
    type=nonneg,
    default=None,
    metavar="I",
    help="this process, 0 .. N-1 (default $JAX_PROCESS_ID)",
  )
  g.add_argument(
    "--distributed",
    action="store_true",
    help="join a cluster JAX detects itself (Cloud TPU pod, SLURM, Open MPI)",
  )


def start_distributed(args: argparse.Namespace) -> bool:
  """Joins the other processes when a distributed flag or JAX_COORDINATOR_ADDRESS is set
  (before any device is touched); off process 0, stdout is silenced. Returns whether it did."""
  from kvjax.lm import distributed

  given = (args.coordinator, args.num_processes, args.process_id)
  if not (
    args.distributed
    or any(v is not None for v in given)
    or os.environ.get(distributed.ENV["coordinator"])
  ):
    return False
  distributed.initialize(*given)
  if not distributed.is_main():
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
  return True


def load_model(args: argparse.Namespace):
  """The model named by --model, cast to --dtype (its weights checked finite unless
  --no-check-finite)."""
  import jax.numpy as jnp

  from kvjax.lm.model import load

  return load(
    args.model,
    dtype=None if args.dtype is None else getattr(jnp, args.dtype),
    check_finite=getattr(args, "check_finite", True),
  )


def sampling_from_flags(args: argparse.Namespace) -> tuple:
  """(Sampling, PRNG key or None) from the sampling flags."""
  import jax

  from kvjax.lm.sampling import Sampling

  sampling = Sampling(
    temperature=args.temperature,
    top_k=args.top_k or 0,
    top_p=1.0 if args.top_p is None else args.top_p,
  )
  return sampling, None if sampling.greedy else jax.random.key(args.seed)


def sampling_kwargs(args: argparse.Namespace) -> dict:
  """Keyword arguments shared by `lm.generate` and `lm.stream`."""
  sampling, key = sampling_from_flags(args)
  return dict(
    max_new_tokens=args.max_new_tokens,
    sampling=sampling,
    key=key,
    stop=tuple(args.stop),
    chat=args.chat,
  )


def finite(x: float) -> float | None:
  """JSON has no NaN/inf: those become null."""
  return float(x) if math.isfinite(x) else None


def stdin_lines():
  """Chat turns: stdin line by line as strict UTF-8 (a prompt on stderr when it is a
  terminal); ValueError naming the line that is not UTF-8."""
  if sys.stdin is None:
    return
  stream = getattr(sys.stdin, "buffer", sys.stdin)
  n = 0
  while True:
    if sys.stdin.isatty():
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = stream.readline()
    if not line:
      return
    n += 1
    line = decode(line, f"stdin line {n}")
    yield line.rstrip("\n")


def read_text(path: str, flag: str = "--text") -> str:
  """The strict UTF-8 text of a file given by `flag` ("-" = stdin); ValueError naming the flag
  and the file otherwise."""
  if path == "-":
    return read_stdin(f"{flag} - (stdin)")
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as err:
    raise ValueError(f"{flag} {path}: {err.strerror}") from None
  return decode(data, f"{flag} {path}")


def model_and_text(args: argparse.Namespace):
  """(the --model, cast to --dtype, and the token ids of the --text file it encodes)."""
  text = read_text(args.text)
  model = load_model(args)
  if model.tokenizer is None:
    raise ValueError(f"{args.model} has no tokenizer.json to encode the text with")
  return model, model.tokenizer.encode(text)
