"""What the training subcommands share: the argparse types, --config merging, the data,
schedule, period and output flag groups."""

from __future__ import annotations

import argparse
import json
import os

from kvjax.lm.cli.flags import checked, nonneg, positive, seed_type
from kvjax.lm.cli.paths import check_input_file, check_output
from kvjax.lm.cli.text import utf8_error

PROG = "python -m kvjax.train"


pos_float = checked(float, lambda v: v > 0, "a number > 0")


nonneg_float = checked(float, lambda v: v >= 0, "a number >= 0")


fraction = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


unit = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def settle(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict) -> None:
  """Fills args left None from --config, then from `defaults`."""
  if args.config is not None:
    merge_config(parser, args)
  for key, value in defaults.items():
    if getattr(args, key) is None:
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
  from kvjax.lm.model import resolve

  if getattr(args, dest) is None:
    parser.error(f"--{dest} DIR_OR_NAME is required ({role})")
  try:
    resolve(getattr(args, dest))
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


def add_data_flags(p: argparse.ArgumentParser, frozen: str):
  """--text / --data and the held-out flags of a task training against a frozen model."""
  g = p.add_argument_group(f"data (tokenized with the {frozen}'s tokenizer)")
  g.add_argument("--text", metavar="FILE", help="train on one plain-text file")
  g.add_argument(
    "--data",
    metavar="DIR_OR_NAME",
    help="a corpus read by kvjax.train.data (a directory of .txt/.md or a name)",
  )
  g.add_argument(
    "--genre",
    action="append",
    metavar="G",
    help="--data: train and eval on these genres only (repeatable)",
  )
  g.add_argument(
    "--exclude-genre",
    action="append",
    metavar="G",
    help="--data: leave these genres out (repeatable)",
  )
  g.add_argument(
    "--eval-split", metavar="SPLIT", help="--data: held-out split (default validation)"
  )
  g.add_argument(
    "--eval-fraction",
    type=fraction,
    metavar="F",
    help="--text: fraction of the text held out (default 0.1)",
  )
  return g


def add_schedule_flags(g, *, warmup: int) -> None:
  """Steps, AdamW, warmup + cosine and seed flags (lr default 1e-3, no weight decay)."""
  g.add_argument("--steps", type=positive, metavar="N")
  g.add_argument("--lr", type=pos_float, metavar="LR", help="peak learning rate (default 1e-3)")
  g.add_argument(
    "--warmup", type=nonneg, metavar="N", help=f"linear warmup steps (default {warmup})"
  )
  g.add_argument(
    "--final-lr-ratio", type=unit, metavar="R", help="cosine decay ends at lr * R (default 0.1)"
  )
  g.add_argument("--weight-decay", type=nonneg_float, metavar="WD", help="default 0")
  g.add_argument("--clip-norm", type=pos_float, metavar="C", help="global gradient norm clip")
  g.add_argument("--seed", type=seed_type, metavar="S", help="in [0, 2**32) (default 0)")


def add_period_flags(g) -> None:
  """Checkpoint and validation periods."""
  g.add_argument("--save-every", type=nonneg, metavar="N", help="checkpoint period (0 = end only)")
  g.add_argument("--keep", type=positive, metavar="N", help="checkpoints kept (default 3)")
  g.add_argument("--eval-every", type=nonneg, metavar="N", help="validation period (0 = end only)")
  g.add_argument(
    "--eval-batches", type=positive, metavar="N", help="held-out batches per validation (default 8)"
  )


def add_output_flags(g) -> None:
  g.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
  g.add_argument(
    "--json", action="store_true", default=None, help="print one JSON summary object on stdout"
  )


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
