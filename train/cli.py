"""`python -m kvjax.train lm` (also `kvjax train lm`): train or fine-tune a Llama-style model.

    python -m kvjax.train lm --text corpus.txt --tokenizer TOK_DIR --out run \\
        --d-model 128 --n-layers 4 --n-heads 4 --steps 2000 --batch-size 16 --seq-len 256
    python -m kvjax.train lm --config run.json          # the same settings as a JSON object
    python -m kvjax.train eval --model shakespeare --data shakespeare --split test --genre comedy
    python -m kvjax.train eagle --target shakespeare --kind eagle3 --data shakespeare --out run
    python -m kvjax.train coprocessor --base shakespeare --latents 16 --data shakespeare --out run

Settings come from flags, then `--config FILE` (a JSON object keyed by flag names with
underscores, e.g. {"d_model": 128, "bf16": true}), then the defaults. A run resumes from the
latest checkpoint in --out. At the end the model is exported as a Hugging Face directory
(--export, default OUT/model). Exit codes: 0 ok, 1 bad data/model/run, 2 bad flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kvjax.lm.cli.flags import checked, nonneg, positive, run

PROG = "python -m kvjax.train"
ARCH = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")
ARCH_DEFAULTS = dict(d_model=128, n_layers=4, n_heads=4)  # only without --init-from
DEFAULTS = dict(batch_size=16, seq_len=256, steps=1000,
                lr=3e-3, warmup=100, weight_decay=0.1, clip_norm=1.0, final_lr_ratio=0.1,
                bf16=False, seed=0, save_every=0, keep=3, eval_every=0, log_every=10,
                eval_fraction=0.1, eval_split="validation", rope_theta=10000.0, data_parallel=0, model_parallel=1,
                no_progress=False, json=False)


pos_float = checked(float, lambda v: v > 0, "a number > 0")
nonneg_float = checked(float, lambda v: v >= 0, "a number >= 0")
fraction = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
unit = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog=prog, description="Train kvjax models.")
  sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
  add_lm(sub)
  add_eval(sub)
  add_eagle(sub)
  add_coprocessor(sub)
  return parser


def add_lm(sub) -> argparse.ArgumentParser:
  """The `lm` subcommand; every default is None so --config and DEFAULTS can fill in."""
  p = sub.add_parser("lm", help="train or fine-tune a language model",
                     description=__doc__.split("\n\n")[2], argument_default=None)
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  g = p.add_argument_group("data")
  g.add_argument("--text", metavar="FILE", help="train on one plain-text file")
  g.add_argument("--data", metavar="DIR_OR_NAME",
                 help="a corpus read by kvjax.train.data (a directory of .txt/.md or a name)")
  g.add_argument("--tokenizer", metavar="DIR",
                 help="directory with tokenizer.json (default: --init-from's tokenizer; with "
                      "--data, a BPE trained on the corpus' train split into OUT/tokenizer)")
  g.add_argument("--vocab-size", type=int, metavar="V",
                 help="--data without --tokenizer: BPE vocabulary size (default 4096)")
  g.add_argument("--genre", action="append", metavar="G",
                 help="--data: train and eval on these genres only (repeatable)")
  g.add_argument("--exclude-genre", action="append", metavar="G",
                 help="--data: leave these genres out (repeatable)")
  g.add_argument("--eval-split", metavar="SPLIT", help="--data: eval split (default validation)")
  g.add_argument("--eval-fraction", type=fraction, metavar="F",
                 help="--text: fraction of the text held out for eval (default 0.1)")
  g = p.add_argument_group("model (vocab_size comes from the tokenizer)")
  for name, kind in (("d_model", positive), ("n_layers", positive), ("n_heads", positive),
                     ("n_kv_heads", positive), ("head_dim", positive), ("ffn_dim", positive),
                     ("max_position", positive)):
    g.add_argument("--" + name.replace("_", "-"), type=kind, metavar="N")
  g.add_argument("--rope-theta", type=pos_float, metavar="X")
  g.add_argument("--init-from", metavar="MODEL_DIR",
                 help="fine-tune this HF-format model (its architecture must match the flags)")
  g = p.add_argument_group("optimisation")
  g.add_argument("--batch-size", type=positive, metavar="B")
  g.add_argument("--seq-len", type=positive, metavar="T")
  g.add_argument("--steps", type=positive, metavar="N")
  g.add_argument("--lr", type=pos_float, metavar="LR", help="peak learning rate")
  g.add_argument("--warmup", type=nonneg, metavar="N", help="linear warmup steps")
  g.add_argument("--final-lr-ratio", type=unit, metavar="R",
                 help="cosine decay ends at lr * R (default 0.1)")
  g.add_argument("--weight-decay", type=nonneg_float, metavar="WD")
  g.add_argument("--clip-norm", type=pos_float, metavar="C", help="global gradient norm clip")
  g.add_argument("--bf16", action="store_true", default=None,
                 help="bfloat16 compute (params and optimizer state stay float32)")
  g.add_argument("--seed", type=nonneg, metavar="S")
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, model)")
  g.add_argument("--save-every", type=nonneg, metavar="N", help="checkpoint period (0 = end only)")
  g.add_argument("--keep", type=positive, metavar="N", help="checkpoints kept (default 3)")
  g.add_argument("--eval-every", type=nonneg, metavar="N", help="eval period (0 = end only)")
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="HF-format export directory (default OUT/model)")
  g.add_argument("--data-parallel", type=nonneg, metavar="N",
                 help="mesh 'data' axis size (0 = all devices / --model-parallel)")
  g.add_argument("--model-parallel", type=positive, metavar="N", help="mesh 'model' axis size")
  _add_output_flags(g)
  p.set_defaults(run=run_lm, check=lambda args: check_lm(p, args))
  return p


def add_eval(sub) -> argparse.ArgumentParser:
  """The `eval` subcommand: a model's loss and bits per character on a corpus split."""
  p = sub.add_parser(
      "eval", help="a model's loss and bits per character on a corpus split",
      description="Scores every token of a corpus split once, in windows of --seq-len tokens "
      "(no context carried between windows), and reports nats per token and bits per "
      "character (tokenizer-independent).")
  p.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                 help="model directory or bundled model name (e.g. shakespeare)")
  p.add_argument("--data", required=True, metavar="DIR_OR_NAME",
                 help="'shakespeare' (the bundled plays) or a directory of .txt/.md files")
  p.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                 help="corpus split (default validation)")
  p.add_argument("--genre", action="append", metavar="G", help="only these genres (repeatable)")
  p.add_argument("--exclude-genre", action="append", metavar="G",
                 help="all genres but these (repeatable)")
  p.add_argument("--batch-size", type=positive, default=16, metavar="B")
  p.add_argument("--seq-len", type=positive, default=256, metavar="T",
                 help="window length in tokens (default 256)")
  p.add_argument("--json", action="store_true", help="print one JSON object")
  p.set_defaults(run=run_eval, check=lambda args: None)
  return p


def run_eval(args: argparse.Namespace) -> int:
  """Loads the model, scores the split, prints the figures; returns 0."""
  from kvjax.lm.model import load
  from kvjax.train import data
  from kvjax.train.lm import TrainError, evaluate_model
  model = load(args.model)
  if model.tokenizer is None:
    raise TrainError(f"--model {args.model} has no tokenizer.json")
  if model.cfg.max_position < args.seq_len:
    raise TrainError(f"--seq-len {args.seq_len} exceeds the model's max_position "
                     f"{model.cfg.max_position}")
  t0 = time.perf_counter()
  batches = data.eval_batches(args.data, args.split, model.tokenizer, batch_size=args.batch_size,
                              seq_len=args.seq_len, genres=args.genre,
                              exclude_genres=args.exclude_genre)
  got = evaluate_model(model, batches)
  out = {"model": args.model, "data": args.data, "split": args.split, "genre": args.genre,
         "exclude_genre": args.exclude_genre, "seq_len": args.seq_len,
         "loss": got["eval_loss"], "bpc": got["eval_bpc"], "tokens": got["eval_tokens"],
         "wall_s": time.perf_counter() - t0}
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{args.model} on {args.data} {args.split}: {out['loss']:.4f} nats/token, "
          f"{out['bpc']:.4f} bits/char over {out['tokens']:,} tokens")
  return 0


def check_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  _settle(parser, args, DEFAULTS)
  _check_run_flags(parser, args, "checkpoints, metrics and the exported model")
  if args.tokenizer is None and args.init_from is None and args.data is None:
    parser.error("--tokenizer DIR is required with --text unless fine-tuning with --init-from")
  if args.vocab_size is not None and (args.tokenizer is not None or args.data is None
                                      or args.vocab_size < 300):
    parser.error("--vocab-size V (>= 300) applies only to --data without --tokenizer")
  if args.init_from is None:
    for key, value in ARCH_DEFAULTS.items():
      if getattr(args, key) is None:
        setattr(args, key, value)
    heads = args.n_heads
    if args.n_kv_heads is not None and heads % args.n_kv_heads:
      parser.error(f"--n-heads {heads} must be a multiple of --n-kv-heads {args.n_kv_heads}")
    if args.head_dim is None and args.d_model % heads:
      parser.error(f"--d-model {args.d_model} is not divisible by --n-heads {heads}; "
                   "pass --head-dim")
  if args.max_position is not None and args.max_position < args.seq_len:
    parser.error(f"--max-position {args.max_position} is smaller than --seq-len {args.seq_len}")


def _settle(parser: argparse.ArgumentParser, args: argparse.Namespace, defaults: dict) -> None:
  """Fills args left None from --config, then from `defaults`."""
  if args.config is not None:
    _merge_config(parser, args)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)


def _check_run_flags(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     goes_to_out: str) -> None:
  """The data, output and schedule rules every training task shares: one of --text / --data,
  an existing --text file, --out, and --warmup below --steps."""
  if (args.text is None) == (args.data is None):
    parser.error("give exactly one of --text FILE and --data DIR_OR_NAME")
  if args.text is not None and not os.path.isfile(args.text):
    parser.error(f"--text {args.text}: no such file")
  if args.out is None:
    parser.error(f"--out DIR is required ({goes_to_out} go there)")
  if args.warmup >= args.steps:
    parser.error(f"--warmup ({args.warmup}) must be smaller than --steps ({args.steps})")


def _check_frozen(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str,
                  role: str) -> None:
  """--<dest> DIR_OR_NAME (the frozen model a task trains against) is given and resolves."""
  from kvjax.lm.model import resolve
  if getattr(args, dest) is None:
    parser.error(f"--{dest} DIR_OR_NAME is required ({role})")
  try:
    resolve(getattr(args, dest))
  except FileNotFoundError as err:
    parser.error(f"--{dest}: {err}")


def _merge_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Fills args left None from the JSON object in --config, parsed by each flag's type."""
  try:
    with open(args.config) as f:
      conf = json.load(f)
  except OSError as err:
    parser.error(f"--config {args.config}: {err.strerror}")
  except json.JSONDecodeError as err:
    parser.error(f"--config {args.config}: invalid JSON ({err})")
  if not isinstance(conf, dict):
    parser.error(f"--config {args.config}: expected a JSON object; got {type(conf).__name__}")
  actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
  for key, value in conf.items():
    if key not in actions:
      parser.error(f"--config {args.config}: unknown setting {key!r}; settings are flag names "
                   f"with underscores: {', '.join(sorted(actions))}")
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


def _tokenizer(args):
  """--tokenizer's, else (with --data, not fine-tuning) one trained on the corpus' train split
  (all genres, so a fine-tune on a genre shares it) and kept in OUT/tokenizer for resumes."""
  from kvjax.lm.tokenizer import Tokenizer
  if args.tokenizer is not None:
    return Tokenizer.load(args.tokenizer)
  if args.init_from is not None:
    return None
  path = os.path.join(args.out, "tokenizer")
  if not os.path.exists(os.path.join(path, "tokenizer.json")):
    from kvjax.train.tokenizer import corpus_tokenizer, save_tokenizer
    print(f"training a {args.vocab_size or 4096}-token BPE on {args.data}'s train split into "
          f"{path}", file=sys.stderr)
    save_tokenizer(corpus_tokenizer(args.data, args.vocab_size or 4096, show_progress=False), path)
  return Tokenizer.load(path)


def _model(args):
  """A random model from the flags, or --init-from's model checked against them."""
  from kvjax.lm.config import Config
  from kvjax.lm.model import init, load
  from kvjax.train.lm import TrainError
  tok = _tokenizer(args)
  if args.init_from is not None:
    model = load(args.init_from)
    cfg = model.cfg
    wrong = [f"{k}={getattr(cfg, k)} (requested {getattr(args, k)})" for k in ARCH
             if getattr(args, k) is not None and getattr(args, k) != getattr(cfg, k)]
    if tok is not None and tok.vocab_size != cfg.vocab_size:
      wrong.append(f"vocab_size={cfg.vocab_size} (--tokenizer has {tok.vocab_size} tokens)")
    if wrong:
      raise TrainError(f"--init-from {args.init_from}: its architecture differs from the "
                       f"requested config: {', '.join(wrong)}")
    if cfg.max_position < args.seq_len:
      raise TrainError(f"--init-from {args.init_from}: max_position {cfg.max_position} is "
                       f"smaller than --seq-len {args.seq_len}")
    if tok is not None:
      import dataclasses
      model = dataclasses.replace(model, tokenizer=tok)
    if model.tokenizer is None:
      raise TrainError(f"--init-from {args.init_from} has no tokenizer.json; pass --tokenizer")
    return model
  cfg = Config(family="llama", vocab_size=tok.vocab_size, d_model=args.d_model,
               n_layers=args.n_layers, n_heads=args.n_heads,
               n_kv_heads=args.n_kv_heads or args.n_heads,
               head_dim=args.head_dim or args.d_model // args.n_heads,
               ffn_dim=args.ffn_dim or 4 * args.d_model,
               max_position=max(args.max_position or 0, args.seq_len),
               rope_theta=args.rope_theta)
  eos = (tok.eos_id,) if tok.eos_id is not None else ()
  return init(cfg, seed=args.seed, tokenizer=tok, eos_ids=eos)


def _data(args, tok):
  """(train batches: start_step -> iterator, eval batches: () -> iterable)."""
  if args.text is not None:
    from kvjax.train.text import TextData
    data = TextData(args.text, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                    seed=args.seed, eval_fraction=args.eval_fraction)
    eval_batches = data.eval_batches if args.eval_fraction > 0 else None
    return data.train_batches, eval_batches
  from kvjax.train.lm import TrainError
  try:
    from kvjax.train import data
  except ImportError as err:
    raise TrainError(f"--data needs the kvjax.train.data module, which cannot be imported "
                     f"({err}); use --text FILE to train on a plain-text file") from None
  common = dict(batch_size=args.batch_size, seq_len=args.seq_len, genres=args.genre,
                exclude_genres=args.exclude_genre)
  train_ds = data.batches(args.data, "train", tok, seed=args.seed, **common)  # checks the corpus
  held: list = []

  def eval_batches():  # built on first use, then re-iterated
    if not held:
      held.append(data.eval_batches(args.data, args.eval_split, tok, **common))
    return held[0]

  return (lambda start: iter(train_ds[start:] if start else train_ds)), eval_batches


def _train_config(args):
  from kvjax.train.lm import TrainConfig
  return TrainConfig(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
      warmup=args.warmup, final_lr_ratio=args.final_lr_ratio, weight_decay=args.weight_decay,
      clip_norm=args.clip_norm, bf16=args.bf16, seed=args.seed, out_dir=args.out,
      save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
      log_every=args.log_every, data_parallel=args.data_parallel,
      model_parallel=args.model_parallel)


def run_lm(args: argparse.Namespace) -> int:
  """Trains, exports, prints a summary; returns 0."""
  from kvjax.lm.model import save
  from kvjax.train.lm import train
  t0 = time.perf_counter()
  tc = _train_config(args)
  model = _model(args)
  batches, eval_batches = _data(args, model.tokenizer)
  result = train(model, tc, batches, eval_batches, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "model")
  save(result.model, export)
  last = result.records[-1] if result.records else {}
  summary = {"out": args.out, "export": export, "steps": tc.steps,
             "resumed_from": result.resumed_from, "n_params": model.cfg.n_params,
             "loss": last.get("loss"), "eval_loss": last.get("eval_loss"),
             "eval_bpc": last.get("eval_bpc"), "wall_s": time.perf_counter() - t0}
  if args.json:
    print(json.dumps(summary))
  else:
    bpc = "" if summary["eval_bpc"] is None else f", eval {summary['eval_bpc']:.3f} bits/char"
    loss = "" if summary["loss"] is None else f"loss {summary['loss']:.4f}{bpc}; "
    print(f"trained {model.cfg.n_params:,} params for {tc.steps} steps ({loss}"
          f"{summary['wall_s']:.1f} s); model exported to {export}", file=sys.stderr)
  return 0


# --- eagle ------------------------------------------------------------------------------------

EAGLE_DEFAULTS = dict(kind="eagle1", batch_size=16, seq_len=256, steps=1000, lr=1e-3, warmup=100,
                      weight_decay=0.0, clip_norm=1.0, final_lr_ratio=0.1, seed=0, ttt_steps=7,
                      self_distill=0, distill_temperature=1.0, save_every=0, keep=3,
                      eval_every=0, log_every=10, eval_batches=8, eval_prompts=4,
                      tree_top_k=8, tree_depth=5, tree_tokens=32, eval_fraction=0.1,
                      eval_split="validation", no_progress=False, json=False)
EAGLE_DESCRIPTION = """\
Trains an EAGLE draft head (kvjax.speculative) for a frozen target model: eagle1 regresses the
target's next top feature and matches its next-token distribution; eagle3 fuses three layers'
features and trains with training-time test (--ttt-steps unrolled draft steps). Data: corpus
batches (--data or --text, the target's tokenizer), or with --self-distill N, N sequences the
target itself generates after corpus prompts (made once, kept in OUT/selfdistill.npy).
Validation (--eval-every and at the end): loss and top-1 agreement on held-out batches, and
val_accept_len, the mean tokens per target forward of greedy speculative generation of 48 tokens
after --eval-prompts held-out 64-token prompts. Settings merge as for `lm` (flags, --config,
defaults); a run resumes from the latest checkpoint in --out. At the end the head is saved with
kvjax.speculative.save_head to --export (default OUT/head). Exit codes: 0 ok, 1 bad
data/target/run, 2 bad flags."""


def _add_data_flags(p: argparse.ArgumentParser, frozen: str):
  """--text / --data and the held-out flags of a task training against a frozen model."""
  g = p.add_argument_group(f"data (tokenized with the {frozen}'s tokenizer)")
  g.add_argument("--text", metavar="FILE", help="train on one plain-text file")
  g.add_argument("--data", metavar="DIR_OR_NAME",
                 help="a corpus read by kvjax.train.data (a directory of .txt/.md or a name)")
  g.add_argument("--genre", action="append", metavar="G",
                 help="--data: train and eval on these genres only (repeatable)")
  g.add_argument("--exclude-genre", action="append", metavar="G",
                 help="--data: leave these genres out (repeatable)")
  g.add_argument("--eval-split", metavar="SPLIT", help="--data: held-out split (default "
                 "validation)")
  g.add_argument("--eval-fraction", type=fraction, metavar="F",
                 help="--text: fraction of the text held out (default 0.1)")
  return g


def _add_schedule_flags(g, *, warmup: int) -> None:
  """Steps, AdamW, warmup + cosine and seed flags (lr default 1e-3, no weight decay)."""
  g.add_argument("--steps", type=positive, metavar="N")
  g.add_argument("--lr", type=pos_float, metavar="LR", help="peak learning rate (default 1e-3)")
  g.add_argument("--warmup", type=nonneg, metavar="N",
                 help=f"linear warmup steps (default {warmup})")
  g.add_argument("--final-lr-ratio", type=unit, metavar="R",
                 help="cosine decay ends at lr * R (default 0.1)")
  g.add_argument("--weight-decay", type=nonneg_float, metavar="WD", help="default 0")
  g.add_argument("--clip-norm", type=pos_float, metavar="C", help="global gradient norm clip")
  g.add_argument("--seed", type=nonneg, metavar="S")


def _add_period_flags(g) -> None:
  """Checkpoint and validation periods."""
  g.add_argument("--save-every", type=nonneg, metavar="N", help="checkpoint period (0 = end only)")
  g.add_argument("--keep", type=positive, metavar="N", help="checkpoints kept (default 3)")
  g.add_argument("--eval-every", type=nonneg, metavar="N", help="validation period (0 = end "
                 "only)")
  g.add_argument("--eval-batches", type=positive, metavar="N",
                 help="held-out batches per validation (default 8)")


def _add_output_flags(g) -> None:
  g.add_argument("--no-progress", action="store_true", default=None, help="no progress bar")
  g.add_argument("--json", action="store_true", default=None,
                 help="print one JSON summary object on stdout")


def add_eagle(sub) -> argparse.ArgumentParser:
  """The `eagle` subcommand; every default is None so --config and EAGLE_DEFAULTS fill in."""
  from kvjax.speculative.head import KINDS
  p = sub.add_parser("eagle", help="train an EAGLE draft head for a frozen target model",
                     description=EAGLE_DESCRIPTION, argument_default=None)
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  p.add_argument("--target", metavar="DIR_OR_NAME",
                 help="the frozen target: a model directory or bundled name (e.g. shakespeare)")
  p.add_argument("--kind", choices=KINDS, help="head kind (default eagle1)")
  g = _add_data_flags(p, "target")
  g.add_argument("--self-distill", type=nonneg, metavar="N",
                 help="train on N sequences the target generates after corpus prompts instead "
                      "(0 = off, the default)")
  g.add_argument("--distill-temperature", type=nonneg_float, metavar="TEMP",
                 help="--self-distill: sampling temperature (0 = greedy; default 1)")
  g = p.add_argument_group("optimisation")
  g.add_argument("--batch-size", type=positive, metavar="B")
  g.add_argument("--seq-len", type=checked(int, lambda v: v >= 3, "an integer >= 3"),
                 metavar="T")
  _add_schedule_flags(g, warmup=100)
  g.add_argument("--ttt-steps", type=positive, metavar="K",
                 help="eagle3: unrolled training-time-test steps (default 7; clipped to "
                      "--seq-len - 1)")
  g.add_argument("--feature-noise", type=nonneg_float, metavar="A",
                 help="uniform noise U(-A, A) on the input features (default 0.1 for eagle1, "
                      "0 for eagle3)")
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, head)")
  _add_period_flags(g)
  g.add_argument("--eval-prompts", type=nonneg, metavar="N",
                 help="held-out prompts for val_accept_len (default 4; 0 = off)")
  g.add_argument("--tree-top-k", type=positive, metavar="K", help="validation draft tree "
                 "(default 8)")
  g.add_argument("--tree-depth", type=positive, metavar="D", help="default 5")
  g.add_argument("--tree-tokens", type=positive, metavar="N", help="default 32")
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="head directory (default OUT/head)")
  _add_output_flags(g)
  p.set_defaults(run=run_eagle, check=lambda args: check_eagle(p, args))
  return p


def check_eagle(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  from kvjax.speculative.head import KINDS
  from kvjax.speculative.tree import TreeSpec
  _settle(parser, args, EAGLE_DEFAULTS)
  if args.kind not in KINDS:
    parser.error(f"--kind must be one of {', '.join(KINDS)}; got {args.kind!r}")
  _check_frozen(parser, args, "target", "the model the head drafts for")
  _check_run_flags(parser, args, "checkpoints, metrics and the head")
  try:
    TreeSpec(top_k=args.tree_top_k, depth=args.tree_depth, total_tokens=args.tree_tokens)
  except ValueError as err:
    parser.error(f"--tree-top-k/--tree-depth/--tree-tokens: {err}")


def _eagle_config(args):
  from kvjax.train.eagle import EagleConfig
  return EagleConfig(
      kind=args.kind, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
      lr=args.lr, warmup=args.warmup, final_lr_ratio=args.final_lr_ratio,
      weight_decay=args.weight_decay, clip_norm=args.clip_norm, seed=args.seed,
      ttt_steps=args.ttt_steps, feature_noise=args.feature_noise,
      self_distill=args.self_distill, distill_temperature=args.distill_temperature,
      out_dir=args.out, save_every=args.save_every, keep=args.keep, eval_every=args.eval_every,
      log_every=args.log_every, eval_batches=args.eval_batches, eval_prompts=args.eval_prompts,
      tree_top_k=args.tree_top_k, tree_depth=args.tree_depth, tree_tokens=args.tree_tokens)


def _eagle_data(args, model, ec):
  """(train batches, eval batches, validation prompts) for `run_eagle`."""
  from kvjax.train import eagle
  from kvjax.train.lm import TrainError
  tok = model.tokenizer
  if tok is None:
    raise TrainError(f"--target {args.target} has no tokenizer.json")
  if args.text is not None:
    from kvjax.train.text import TextData
    td = TextData(args.text, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                  seed=args.seed, eval_fraction=args.eval_fraction)
    batches = td.train_batches
    eval_batches = td.eval_batches if args.eval_fraction > 0 else None
    train_stream, held_stream = eagle.text_streams(td)
  else:
    from kvjax.train import data
    batches, eval_batches = _data(args, tok)
    streams = {}

    def stream(split):
      if split not in streams:
        s = data.split_stream(args.data, split, tok, genres=args.genre,
                              exclude_genres=args.exclude_genre)
        streams[split] = (s.tokens, s.doc)
      return streams[split]

    held_stream = stream(args.eval_split) if ec.eval_prompts else None
    train_stream = stream("train") if ec.self_distill else None
  prompts = []
  if ec.eval_prompts and held_stream is not None and len(held_stream[0]):
    prompts = eagle.prompts_from_stream(*held_stream, ec.eval_prompts, ec.prompt_len)
  if ec.self_distill:
    import numpy as np
    length = min(args.seq_len + 1, model.cfg.max_position)
    starts = eagle.prompts_from_stream(*train_stream, ec.self_distill, min(32, length // 4),
                                       rng=np.random.default_rng(args.seed))
    seqs = eagle.self_distill(model, starts, length, temperature=args.distill_temperature,
                              seed=args.seed, path=os.path.join(args.out, eagle.DISTILL_FILE),
                              progress=not args.no_progress)
    if length < args.seq_len + 1:
      seqs = np.pad(seqs, ((0, 0), (0, args.seq_len + 1 - length)), constant_values=-1)
    batches = eagle.SequenceData(seqs, batch_size=args.batch_size, seed=args.seed).train_batches
  return batches, eval_batches, prompts


def run_eagle(args: argparse.Namespace) -> int:
  """Trains the head, saves it, prints a summary; returns 0."""
  import jax
  from kvjax.lm.model import load
  from kvjax.speculative import head as heads
  from kvjax.train.eagle import train
  t0 = time.perf_counter()
  ec = _eagle_config(args)
  model = load(args.target)
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches, prompts = _eagle_data(args, model, ec)
  head = heads.init(model, ec.kind, seed=args.seed)
  result = train(model, head, ec, batches, eval_batches, prompts, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "head")
  heads.save(result.head, export)
  last = result.records[-1] if result.records else {}
  keys = ("loss", "feature_loss", "ce", "top1", "eval_loss", "eval_top1", "val_accept_len")
  summary = {"out": args.out, "export": export, "kind": ec.kind, "target": args.target,
             "steps": ec.steps, "resumed_from": result.resumed_from,
             "n_params": sum(a.size for a in jax.tree.leaves(result.head.params())),
             **{k: last.get(k) for k in keys}, "wall_s": time.perf_counter() - t0}
  if args.json:
    print(json.dumps(summary))
  else:
    got = ", ".join(f"{k} {last[k]:.4f}" for k in keys if last.get(k) is not None)
    print(f"trained a {ec.kind} head ({summary['n_params']:,} params) for {ec.steps} steps "
          f"({got}; {summary['wall_s']:.1f} s); head saved to {export}", file=sys.stderr)
  return 0


# --- coprocessor ------------------------------------------------------------------------------

COP_DEFAULTS = dict(kind="coprocessor", init="copy", lora_rank=16, latent_offset=-33, ahead=16,
                    points=16, delay=0,
                    batch_size=8, seq_len=256, steps=1000, lr=1e-3, warmup=50, weight_decay=0.0,
                    clip_norm=1.0, final_lr_ratio=0.1, seed=0, save_every=0, keep=3,
                    eval_every=0, log_every=10, eval_batches=8, eval_fraction=0.1,
                    eval_split="validation", no_progress=False, json=False)
COP_DESCRIPTION = """\
Trains a cache coprocessor (kvjax.coprocessor) for a frozen base model: at --points random
augmentation points per sequence the coprocessor reads the base's cache of the prefix with
--latents soft tokens and writes that many latents into it; the loss is the base's nll of the
--ahead tokens after each point, every point of a sequence in one pass with a block-sparse
mask. Only the coprocessor and the soft tokens train. --kind pause trains the pause-token
baseline (the soft tokens inserted directly, no coprocessor). Validation (--eval-every and at
the end): held-out ahead loss with and without augmentation and the relative perplexity
reduction at the first ahead position. Settings merge as for `lm` (flags, --config,
defaults); a run resumes from the latest checkpoint in --out. At the end the coprocessor is
saved with kvjax.coprocessor.save to --export (default OUT/coprocessor). Exit codes: 0 ok, 1
bad data/base/run, 2 bad flags."""


def add_coprocessor(sub) -> argparse.ArgumentParser:
  """The `coprocessor` subcommand; every default is None so --config and COP_DEFAULTS fill in."""
  from kvjax.coprocessor.model import INITS, KINDS
  p = sub.add_parser("coprocessor", help="train a cache coprocessor for a frozen base model",
                     description=COP_DESCRIPTION, argument_default=None)
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  p.add_argument("--base", metavar="DIR_OR_NAME",
                 help="the frozen base: a model directory or bundled name (e.g. shakespeare)")
  p.add_argument("--latents", type=positive, metavar="N", help="latents per augmentation")
  p.add_argument("--kind", choices=KINDS, help="coprocessor (default) or the pause-token "
                 "baseline")
  p.add_argument("--init", choices=INITS, help="coprocessor start: a copy of the base trained "
                 "in full (default), from scratch, or LoRA deltas on the frozen copy")
  p.add_argument("--lora-rank", type=positive, metavar="R", help="--init lora: rank (default 16)")
  p.add_argument("--latent-offset", type=checked(int, lambda v: v <= -1, "an integer <= -1"),
                 metavar="O", help="the base sees the latents at the next token's position + O "
                 "(default -33: 32 behind the prefix's last token)")
  _add_data_flags(p, "base")
  g = p.add_argument_group("optimisation")
  g.add_argument("--ahead", type=positive, metavar="A",
                 help="teacher-forced tokens scored after each point (default 16)")
  g.add_argument("--points", type=positive, metavar="M",
                 help="augmentation points per sequence, all in one pass (default 16)")
  g.add_argument("--delay", type=nonneg, metavar="K",
                 help="insert the latents K tokens after their point (default 0)")
  g.add_argument("--batch-size", type=positive, metavar="B")
  g.add_argument("--seq-len", type=checked(int, lambda v: v >= 2, "an integer >= 2"),
                 metavar="T")
  _add_schedule_flags(g, warmup=50)
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, "
                 "coprocessor)")
  _add_period_flags(g)
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="coprocessor directory (default "
                 "OUT/coprocessor)")
  _add_output_flags(g)
  p.set_defaults(run=run_coprocessor, check=lambda args: check_coprocessor(p, args))
  return p


def check_coprocessor(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  _settle(parser, args, COP_DEFAULTS)
  _check_frozen(parser, args, "base", "the frozen model the coprocessor serves")
  if args.latents is None:
    parser.error("--latents N is required (latents per augmentation, e.g. 16)")
  _check_run_flags(parser, args, "checkpoints, metrics and the coprocessor")
  from kvjax.coprocessor.traces import room_error
  error = room_error(args.seq_len, args.ahead, args.points, args.delay, flags=True)
  if error:
    parser.error(error)
  if args.kind == "pause" and (args.init != "copy" or args.lora_rank != 16):
    parser.error("--init and --lora-rank apply to --kind coprocessor, not to pause tokens")


def _cop_config(args):
  from kvjax.train.coprocessor import AugmentConfig
  return AugmentConfig(
      steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
      warmup=args.warmup, final_lr_ratio=args.final_lr_ratio, weight_decay=args.weight_decay,
      clip_norm=args.clip_norm, seed=args.seed, ahead=args.ahead, points=args.points,
      delay=args.delay, out_dir=args.out, save_every=args.save_every, keep=args.keep,
      eval_every=args.eval_every, log_every=args.log_every, eval_batches=args.eval_batches)


def run_coprocessor(args: argparse.Namespace) -> int:
  """Trains the coprocessor, saves it, prints a summary; returns 0."""
  from kvjax import coprocessor
  from kvjax.lm.model import load
  from kvjax.train.coprocessor import train
  from kvjax.train.lm import TrainError
  t0 = time.perf_counter()
  ac = _cop_config(args)
  base = load(args.base)
  if base.tokenizer is None:
    raise TrainError(f"--base {args.base} has no tokenizer.json")
  os.makedirs(args.out, exist_ok=True)
  batches, eval_batches = _data(args, base.tokenizer)
  cop = coprocessor.init(base, args.latents, kind=args.kind, init=args.init,
                         lora_rank=args.lora_rank, latent_offset=args.latent_offset,
                         seed=args.seed)
  result = train(base, cop, ac, batches, eval_batches, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "coprocessor")
  coprocessor.save(result.coprocessor, export)
  last = result.records[-1] if result.records else {}
  keys = ("loss", "base_loss", "eval_loss", "eval_base_loss", "eval_reduction_1",
          "eval_reduction")
  import jax
  summary = {"out": args.out, "export": export, "kind": args.kind, "init": cop.cc.init,
             "latents": args.latents, "base": args.base, "steps": ac.steps,
             "resumed_from": result.resumed_from,
             "n_params": sum(a.size for a in jax.tree.leaves(result.coprocessor.params)),
             **{k: last.get(k) for k in keys}, "wall_s": time.perf_counter() - t0}
  if args.json:
    print(json.dumps(summary))
  else:
    got = ", ".join(f"{k} {last[k]:.4f}" for k in keys if last.get(k) is not None)
    print(f"trained a {args.latents}-latent {args.kind} ({summary['n_params']:,} params) for "
          f"{ac.steps} steps ({got}; {summary['wall_s']:.1f} s); saved to {export}",
          file=sys.stderr)
  return 0


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
  """Runs `PROG ARGV...`; returns the exit code (0 ok, 1 library error, 2 bad flags)."""
  return run(build_parser(prog), argv, lambda args: f"{prog} {args.task}")
