"""What the training subcommands share: the argparse types, the flag tables and the flag groups
built from them, the task parser with --config, settling the defaults, the run config and
summary, and the data."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from kvjax.lm.cli.flags import checked, nonneg, positive, seed_type
from kvjax.lm.cli.paths import check_input_file, check_output
from kvjax.lm.cli.text import utf8_error

PROG = "python -m kvjax.train"


pos_float = checked(float, lambda v: v > 0, "a number > 0")


nonneg_float = checked(float, lambda v: v >= 0, "a number >= 0")


fraction = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


unit = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


# A flag table row: (flag, type, metavar, help). The type is an argparse type (None: a string),
# SWITCH (a store_true flag) or REPEATED (a string flag that may be given several times: a list).
Flag = tuple[str, Any, str | None, str | None]
SWITCH = "switch"
REPEATED = "repeated"


def add_flags(g, rows: Iterable[Flag]) -> None:
  """Adds a flag per row to the parser or group g, each with default None (so that --config and
  the task's defaults can fill in: `settle`)."""
  for flag, type_, metavar, help_ in rows:
    if type_ is SWITCH:
      g.add_argument(flag, action="store_true", default=None, help=help_)
    elif type_ is REPEATED:
      g.add_argument(flag, action="append", metavar=metavar, help=help_)
    else:
      g.add_argument(flag, type=type_, metavar=metavar, help=help_)


SOURCE_FLAGS: tuple[Flag, ...] = (
  ("--text", None, "FILE", "train on one plain-text file"),
  (
    "--data",
    None,
    "DIR_OR_NAME",
    "a corpus read by kvjax.train.data (a directory of .txt/.md or a name)",
  ),
)
GENRE_FLAGS: tuple[Flag, ...] = (
  ("--genre", REPEATED, "G", "--data: train and eval on these genres only (repeatable)"),
  ("--exclude-genre", REPEATED, "G", "--data: leave these genres out (repeatable)"),
)
FINAL_LR_FLAG: Flag = ("--final-lr-ratio", unit, "R", "cosine decay ends at lr * R (default 0.1)")
SEED_FLAG: Flag = ("--seed", seed_type, "S", "in [0, 2**32) (default 0)")
SAVE_FLAGS: tuple[Flag, ...] = (
  ("--save-every", nonneg, "N", "checkpoint period (0 = end only)"),
  ("--keep", positive, "N", "checkpoints kept (default 3)"),
)
LOG_EVERY_FLAG: Flag = ("--log-every", nonneg, "N", "metrics period (default 10)")
OUTPUT_FLAGS: tuple[Flag, ...] = (
  ("--no-progress", SWITCH, None, "no progress bar"),
  ("--json", SWITCH, None, "print one JSON summary object on stdout"),
)
# The defaults of flags several tasks share that no run config holds (a task's own win):
# the batches and schedule, and the data and output.
SCHEDULE_DEFAULTS = dict(batch_size=16, seq_len=256, steps=1000, warmup=100)
DATA_DEFAULTS = dict(eval_fraction=0.1, eval_split="validation", no_progress=False, json=False)


def add_task(
  sub,
  name: str,
  help_: str,
  description: str,
  run: Callable[[argparse.Namespace], int],
  check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None,
  *,
  config: bool = True,
) -> argparse.ArgumentParser:
  """The parser of task `name`: its args run `check(parser, args)` (when given), then
  `run(args)`. config: a training task's, with --config FILE (`check` settles the args: every
  flag's default is None so that --config and the defaults fill in)."""
  p = sub.add_parser(name, help=help_, description=description, argument_default=None)
  if config:
    p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  p.set_defaults(run=run, check=lambda args: None if check is None else check(p, args))
  return p


def frozen_flag(dest: str) -> Flag:
  """--<dest> DIR_OR_NAME: the frozen model a task trains against (see `check_frozen`)."""
  help_ = f"the frozen {dest}: a model directory or bundled name (e.g. shakespeare)"
  return (f"--{dest}", None, "DIR_OR_NAME", help_)


def add_data_flags(p: argparse.ArgumentParser, frozen: str):
  """--text / --data and the held-out flags of a task training against a frozen model."""
  g = p.add_argument_group(f"data (tokenized with the {frozen}'s tokenizer)")
  add_flags(
    g,
    (
      *SOURCE_FLAGS,
      *GENRE_FLAGS,
      ("--eval-split", None, "SPLIT", "--data: held-out split (default validation)"),
      ("--eval-fraction", fraction, "F", "--text: fraction of the text held out (default 0.1)"),
    ),
  )
  return g


def batch_flags(min_seq_len: int) -> tuple[Flag, ...]:
  """--batch-size and --seq-len (at least min_seq_len) of a task training against a frozen
  model."""
  at_least = checked(int, lambda v: v >= min_seq_len, f"an integer >= {min_seq_len}")
  return (("--batch-size", positive, "B", None), ("--seq-len", at_least, "T", None))


def schedule_flags(warmup: int) -> tuple[Flag, ...]:
  """Steps, AdamW, warmup + cosine and seed flags (lr default 1e-3, no weight decay)."""
  return (
    ("--steps", positive, "N", None),
    ("--lr", pos_float, "LR", "peak learning rate (default 1e-3)"),
    ("--warmup", nonneg, "N", f"linear warmup steps (default {warmup})"),
    FINAL_LR_FLAG,
    ("--weight-decay", nonneg_float, "WD", "default 0"),
    ("--clip-norm", pos_float, "C", "global gradient norm clip"),
    SEED_FLAG,
  )


def run_flags(made: str, validation: tuple[Flag, ...] = ()) -> tuple[Flag, ...]:
  """The "run" group of a task that trains a `made` (head, coprocessor) against a frozen
  model: --out, the checkpoint and validation periods, `validation`, --log-every, --export and
  the output switches."""
  return (
    ("--out", None, "DIR", f"run directory (checkpoints, metrics, {made})"),
    *SAVE_FLAGS,
    ("--eval-every", nonneg, "N", "validation period (0 = end only)"),
    ("--eval-batches", positive, "N", "held-out batches per validation (default 8)"),
    *validation,
    LOG_EVERY_FLAG,
    ("--export", None, "DIR", f"{made} directory (default OUT/{made})"),
    *OUTPUT_FLAGS,
  )


def field_defaults(cls) -> dict[str, Any]:
  """The defaults of the dataclass cls's fields that have one."""
  return {
    f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
  }


def settle(
  parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict[str, Any], *configs
) -> None:
  """Fills args left None from --config, then from the first that holds the setting of:
  `defaults` (the task's own), SCHEDULE_DEFAULTS, DATA_DEFAULTS, the field defaults of the
  dataclasses `configs` (those the flags make; a field that no flag sets is passed over)."""
  if args.config is not None:
    merge_config(parser, args)
  dests = {a.dest for a in parser._actions}
  for values in (defaults, SCHEDULE_DEFAULTS, DATA_DEFAULTS, *map(field_defaults, configs)):
    for key, value in values.items():
      if key in dests and getattr(args, key) is None:
        setattr(args, key, value)


def check_run_flags(
  parser: argparse.ArgumentParser, args: argparse.Namespace, goes_to_out: str
) -> None:
  """The data, output and schedule rules every training task shares: one of --text / --data,
  a readable --text file, a writable --out (and --export), whose latest checkpoint (when
  resuming) is not visibly damaged (TrainError, exit 1), and --warmup below --steps."""
  if (args.text is None) == (args.data is None):
    parser.error("give exactly one of --text FILE and --data DIR_OR_NAME")
  check_input_file(parser, "--text", args.text)
  if args.out is None:
    parser.error(f"--out DIR is required ({goes_to_out} go there)")
  check_output(parser, "--out", args.out, directory=True)
  check_output(parser, "--export", getattr(args, "export", None), directory=True)
  from kvjax.train.checkpoints import CHECKPOINTS, check_checkpoints

  check_checkpoints(os.path.join(args.out, CHECKPOINTS))  # a resume's, before the model loads
  if args.warmup >= args.steps:
    parser.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")


def check_frozen(
  parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str, role: str
) -> None:
  """--<dest> DIR_OR_NAME (the frozen model a task trains against) is given and resolves."""
  from kvjax.lm.model import find

  if getattr(args, dest) is None:
    parser.error(f"--{dest} DIR_OR_NAME is required ({role})")
  try:
    find(getattr(args, dest))
  except FileNotFoundError as err:
    parser.error(f"--{dest}: {err}")


def merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Fills args left None from the JSON object in --config, parsed by each flag's type."""
  try:
    with open(args.config, "rb") as f:
      conf = json.loads(f.read().decode("utf-8"))
  except OSError as err:
    parser.error(f"--config {args.config}: {err.strerror}")
  except UnicodeDecodeError as err:
    parser.error(f"--config {args.config}: not UTF-8 text ({utf8_error(err)})")
  except json.JSONDecodeError as err:
    parser.error(f"--config {args.config}: invalid JSON ({err})")
  if not isinstance(conf, dict):
    parser.error(f"--config {args.config}: expected a JSON object; got {type(conf).__name__}")
  actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
  for key, value in conf.items():
    if key not in actions:
      parser.error(
        f"--config {args.config}: unknown setting {key!r}; settings are flag names "
        f"with underscores: {', '.join(sorted(actions))}"
      )
    if getattr(args, key) is not None:
      continue  # the command line wins
    action = actions[key]
    if isinstance(action, argparse._StoreTrueAction):
      if not isinstance(value, bool):
        parser.error(f"--config {args.config}: {key} must be true or false; got {value!r}")
    elif action.type is not None:
      if isinstance(value, (bool, list, dict)) or value is None:
        parser.error(f"--config {args.config}: {key} must be a number; got {value!r}")
      try:
        value = action.type(str(value))
      except argparse.ArgumentTypeError as err:
        parser.error(f"--config {args.config}: {key}: {err}")
    elif not isinstance(value, str):
      parser.error(f"--config {args.config}: {key} must be a string; got {value!r}")
    setattr(args, key, value)


def text_data(args, tok):
  """The --text file as kvjax.train.text.TextData; DataError naming it when it is not UTF-8."""
  from kvjax.train.text import DataError, TextData

  try:
    return TextData(
      args.text,
      tok,
      seq_len=args.seq_len,
      batch_size=args.batch_size,
      seed=args.seed,
      eval_fraction=args.eval_fraction,
    )
  except UnicodeDecodeError as err:
    raise DataError(f"--text {args.text}: not UTF-8 text ({utf8_error(err)})") from None


def data_batches(args, tok):
  """(train batches: start_step -> iterator, eval batches: () -> iterable)."""
  if args.text is not None:
    data = text_data(args, tok)
    eval_batches = data.eval_batches if args.eval_fraction > 0 else None
    return data.train_batches, eval_batches
  from kvjax.train.lm import TrainError

  try:
    from kvjax.train import data
  except ImportError as err:
    raise TrainError(
      f"--data needs the kvjax.train.data module, which cannot be imported "
      f"({err}); use --text FILE to train on a plain-text file"
    ) from None
  common = dict(
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    genres=args.genre,
    exclude_genres=args.exclude_genre,
    bos=bool(getattr(args, "bos_rows", False)),
  )
  train_ds = data.batches(args.data, "train", tok, seed=args.seed, **common)  # checks the corpus
  held: list = []

  def eval_batches():  # built on first use, then re-iterated
    if not held:
      held.append(data.eval_batches(args.data, args.eval_split, tok, **common))
    return held[0]

  return (lambda start: iter(train_ds[start:] if start else train_ds)), eval_batches


def run_config(cls, args: argparse.Namespace):
  """The run config cls (a `kvjax.train.loop.RunConfig`) of the settled args: every field that
  has a flag from it, out_dir from --out, the others at their defaults."""
  given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
  return cls(**given, out_dir=args.out)


def run_summary(
  args: argparse.Namespace, t0: float, result, export: str, n_params: int, keys, **task
) -> dict[str, Any]:
  """The JSON summary of a run: out, export, the `task` fields, steps, resumed_from,
  n_params, the last log record's `keys` (None where it has none) and wall_s since t0."""
  last = result.records[-1] if result.records else {}
  return {
    "out": args.out,
    "export": export,
    **task,
    "steps": args.steps,
    "resumed_from": result.resumed_from,
    "n_params": n_params,
    **{k: last.get(k) for k in keys},
    "wall_s": time.perf_counter() - t0,
  }


def metrics_text(summary: dict[str, Any], keys) -> str:
  """The summary's `keys` that have a value, as "key value, ..." (4 decimals)."""
  return ", ".join(f"{k} {summary[k]:.4f}" for k in keys if summary[k] is not None)


def finish(args: argparse.Namespace, summary: dict[str, Any], line: str) -> int:
  """Prints summary as one JSON object on stdout with --json, else `line` on stderr; returns 0
  (the exit code)."""
  if args.json:
    print(json.dumps(summary))
  else:
    print(line, file=sys.stderr)
  return 0
