"""`python -m kvjax.train lm` (also `kvjax train lm`): train or fine-tune a Llama-style model."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kvjax.lm import distributed
from kvjax.lm.cli.flags import (
  add_distributed_flags,
  checked,
  nonneg,
  positive,
  seed_type,
  start_distributed,
)
from kvjax.lm.cli.paths import check_output
from kvjax.train.cli.common import (
  add_output_flags,
  check_run_flags,
  data_batches,
  fraction,
  nonneg_float,
  pos_float,
  settle,
  unit,
)

DESCRIPTION = """\
Settings come from flags, then `--config FILE` (a JSON object keyed by flag names with
underscores, e.g. {"d_model": 128, "bf16": true}), then the defaults. A run resumes from the
latest checkpoint in --out. At the end the model is exported as a Hugging Face directory
(--export, default OUT/model). Exit codes: 0 ok, 1 bad data/model/run, 2 bad flags."""
ARCH = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


ARCH_DEFAULTS = dict(d_model=128, n_layers=4, n_heads=4)  # only without --init-from


DEFAULTS = dict(
  batch_size=16,
  seq_len=256,
  steps=1000,
  lr=3e-3,
  warmup=100,
  weight_decay=0.1,
  clip_norm=1.0,
  final_lr_ratio=0.1,
  bf16=False,
  seed=0,
  save_every=0,
  keep=3,
  eval_every=0,
  log_every=10,
  keep_best=False,
  patience=0,
  bos_rows=False,
  dropout=0.0,
  attn_dropout=0.0,
  eval_fraction=0.1,
  eval_split="validation",
  rope_theta=10000.0,
  data_parallel=0,
  model_parallel=1,
  no_progress=False,
  json=False,
)


def add_lm(sub) -> argparse.ArgumentParser:
  """The `lm` subcommand; every default is None so --config and DEFAULTS can fill in."""
  p = sub.add_parser(
    "lm", help="train or fine-tune a language model", description=DESCRIPTION, argument_default=None
  )
  p.add_argument("--config", metavar="FILE", help="JSON object of settings (flags win)")
  _add_data_flags(p)
  _add_model_flags(p)
  _add_optimisation_flags(p)
  _add_run_flags(p)
  add_distributed_flags(p)
  p.set_defaults(run=run_lm, check=lambda args: check_lm(p, args))
  return p


def _add_data_flags(p: argparse.ArgumentParser) -> None:
  """The training text or corpus, its tokenizer and the held-out part."""
  g = p.add_argument_group("data")
  g.add_argument("--text", metavar="FILE", help="train on one plain-text file")
  g.add_argument(
    "--data",
    metavar="DIR_OR_NAME",
    help="a corpus read by kvjax.train.data (a directory of .txt/.md or a name)",
  )
  g.add_argument(
    "--tokenizer",
    metavar="DIR",
    help="directory with tokenizer.json (default: --init-from's tokenizer; with "
    "--data, a BPE trained on the corpus' train split into OUT/tokenizer)",
  )
  g.add_argument(
    "--vocab-size",
    type=int,
    metavar="V",
    help="--data without --tokenizer: BPE vocabulary size (default 4096)",
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
  g.add_argument("--eval-split", metavar="SPLIT", help="--data: eval split (default validation)")
  g.add_argument(
    "--bos-rows",
    action="store_true",
    default=None,
    help="--data: start every packed row with the tokenizer's BOS token, as real "
    "LMs are trained (default: rows start wherever the stream is)",
  )
  g.add_argument(
    "--eval-fraction",
    type=fraction,
    metavar="F",
    help="--text: fraction of the text held out for eval (default 0.1)",
  )


def _add_model_flags(p: argparse.ArgumentParser) -> None:
  """The architecture of a new model, or the model to fine-tune."""
  g = p.add_argument_group("model (vocab_size comes from the tokenizer)")
  for name, help_ in (
    ("d_model", "model width (default 128; without --init-from)"),
    ("n_layers", "layers (default 4)"),
    ("n_heads", "query heads (default 4)"),
    ("n_kv_heads", "kv heads (default: --n-heads)"),
    ("head_dim", "head dimension (default: --d-model / --n-heads)"),
    ("ffn_dim", "MLP width (default 4 x --d-model)"),
    ("max_position", "the model's context (default and minimum: --seq-len)"),
  ):
    g.add_argument("--" + name.replace("_", "-"), type=positive, metavar="N", help=help_)
  g.add_argument("--rope-theta", type=pos_float, metavar="X", help="RoPE base (default 10000)")
  g.add_argument(
    "--init-from",
    metavar="MODEL_DIR",
    help="fine-tune this HF-format model (its architecture must match the flags)",
  )


def _add_optimisation_flags(p: argparse.ArgumentParser) -> None:
  """Batches, AdamW and its schedule, precision, dropout and the seed."""
  g = p.add_argument_group("optimisation")
  g.add_argument("--batch-size", type=positive, metavar="B", help="rows per step (default 16)")
  g.add_argument("--seq-len", type=positive, metavar="T", help="tokens per row (default 256)")
  g.add_argument(
    "--steps",
    type=positive,
    metavar="N",
    help="optimizer steps in all; a resumed run continues up to it (default 1000)",
  )
  g.add_argument("--lr", type=pos_float, metavar="LR", help="peak learning rate (default 3e-3)")
  g.add_argument("--warmup", type=nonneg, metavar="N", help="linear warmup steps (default 100)")
  g.add_argument(
    "--final-lr-ratio", type=unit, metavar="R", help="cosine decay ends at lr * R (default 0.1)"
  )
  g.add_argument(
    "--weight-decay", type=nonneg_float, metavar="WD", help="AdamW weight decay (default 0.1)"
  )
  g.add_argument(
    "--clip-norm", type=pos_float, metavar="C", help="global gradient norm clip (default 1)"
  )
  g.add_argument(
    "--bf16",
    action="store_true",
    default=None,
    help="bfloat16 compute (params and optimizer state stay float32)",
  )
  g.add_argument(
    "--dropout",
    type=fraction,
    metavar="P",
    help="residual dropout of every attention and MLP output while training (default 0)",
  )
  g.add_argument(
    "--attn-dropout",
    type=fraction,
    metavar="P",
    help="dropout of the attention probabilities while training (default 0)",
  )
  g.add_argument("--seed", type=seed_type, metavar="S", help="in [0, 2**32) (default 0)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
  """Where the run goes, how often it saves, evaluates and logs, early stopping, the mesh."""
  g = p.add_argument_group("run")
  g.add_argument("--out", metavar="DIR", help="run directory (checkpoints, metrics, model)")
  g.add_argument("--save-every", type=nonneg, metavar="N", help="checkpoint period (0 = end only)")
  g.add_argument("--keep", type=positive, metavar="N", help="checkpoints kept (default 3)")
  g.add_argument("--eval-every", type=nonneg, metavar="N", help="eval period (0 = end only)")
  g.add_argument(
    "--keep-best",
    action="store_true",
    default=None,
    help="also keep the checkpoint of the best validation bits per character in "
    "OUT/best (export it with `train export --step best`)",
  )
  g.add_argument(
    "--patience",
    type=nonneg,
    metavar="N",
    help="stop early after N evaluations without a better validation bits per "
    "character (0 = never; needs --eval-every)",
  )
  g.add_argument("--log-every", type=nonneg, metavar="N", help="metrics period (default 10)")
  g.add_argument("--export", metavar="DIR", help="HF-format export directory (default OUT/model)")
  g.add_argument(
    "--data-parallel",
    type=nonneg,
    metavar="N",
    help="mesh 'data' axis size (0 = all devices / --model-parallel)",
  )
  g.add_argument("--model-parallel", type=positive, metavar="N", help="mesh 'model' axis size")
  add_output_flags(g)


def check_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  settle(parser, args, DEFAULTS)
  check_run_flags(parser, args, "checkpoints, metrics and the exported model")
  if args.tokenizer is None and args.init_from is None and args.data is None:
    parser.error("--tokenizer DIR is required with --text unless fine-tuning with --init-from")
  if args.vocab_size is not None and (
    args.tokenizer is not None or args.data is None or args.vocab_size < 300
  ):
    parser.error("--vocab-size V (>= 300) applies only to --data without --tokenizer")
  if args.init_from is None:
    for key, value in ARCH_DEFAULTS.items():
      if getattr(args, key) is None:
        setattr(args, key, value)
    heads = args.n_heads
    if args.n_kv_heads is not None and heads % args.n_kv_heads:
      parser.error(f"--n-heads {heads} must be a multiple of --n-kv-heads {args.n_kv_heads}")
    if args.head_dim is None and args.d_model % heads:
      parser.error(
        f"--d-model {args.d_model} is not divisible by --n-heads {heads}; pass --head-dim"
      )
  if args.bos_rows and args.data is None:
    parser.error(
      "--bos-rows applies to --data (a --text file is one document that already starts with BOS)"
    )
  if args.max_position is not None and args.max_position < args.seq_len:
    parser.error(f"--max-position {args.max_position} is smaller than --seq-len {args.seq_len}")


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

    print(
      f"training a {args.vocab_size or 4096}-token BPE on {args.data}'s train split into {path}",
      file=sys.stderr,
    )
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
    wrong = [
      f"{k}={getattr(cfg, k)} (requested {getattr(args, k)})"
      for k in ARCH
      if getattr(args, k) is not None and getattr(args, k) != getattr(cfg, k)
    ]
    if tok is not None and tok.vocab_size != cfg.vocab_size:
      wrong.append(f"vocab_size={cfg.vocab_size} (--tokenizer has {tok.vocab_size} tokens)")
    if wrong:
      raise TrainError(
        f"--init-from {args.init_from}: its architecture differs from the "
        f"requested config: {', '.join(wrong)}"
      )
    if cfg.max_position < args.seq_len:
      raise TrainError(
        f"--init-from {args.init_from}: max_position {cfg.max_position} is "
        f"smaller than --seq-len {args.seq_len}"
      )
    if tok is not None:
      import dataclasses

      model = dataclasses.replace(model, tokenizer=tok)
    if model.tokenizer is None:
      raise TrainError(f"--init-from {args.init_from} has no tokenizer.json; pass --tokenizer")
    return model
  cfg = Config(
    family="llama",
    vocab_size=tok.vocab_size,
    d_model=args.d_model,
    n_layers=args.n_layers,
    n_heads=args.n_heads,
    n_kv_heads=args.n_kv_heads or args.n_heads,
    head_dim=args.head_dim or args.d_model // args.n_heads,
    ffn_dim=args.ffn_dim or 4 * args.d_model,
    max_position=max(args.max_position or 0, args.seq_len),
    rope_theta=args.rope_theta,
  )
  eos = (tok.eos_id,) if tok.eos_id is not None else ()
  return init(cfg, seed=args.seed, tokenizer=tok, eos_ids=eos)


def _train_config(args):
  from kvjax.train.lm import TrainConfig

  return TrainConfig(
    steps=args.steps,
    batch_size=args.batch_size,
    seq_len=args.seq_len,
    lr=args.lr,
    warmup=args.warmup,
    final_lr_ratio=args.final_lr_ratio,
    weight_decay=args.weight_decay,
    clip_norm=args.clip_norm,
    bf16=args.bf16,
    dropout=args.dropout,
    attn_dropout=args.attn_dropout,
    seed=args.seed,
    out_dir=args.out,
    save_every=args.save_every,
    keep=args.keep,
    eval_every=args.eval_every,
    log_every=args.log_every,
    keep_best=args.keep_best,
    patience=args.patience,
    data_parallel=args.data_parallel,
    model_parallel=args.model_parallel,
  )


def run_lm(args: argparse.Namespace) -> int:
  """Trains, exports, prints a summary; returns 0."""
  from kvjax.lm.model import save
  from kvjax.train.lm import train

  t0 = time.perf_counter()
  start_distributed(args)
  tc = _train_config(args)
  model = _model(args)
  batches, eval_batches = data_batches(args, model.tokenizer)
  result = train(model, tc, batches, eval_batches, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "model")
  if distributed.is_main():
    save(result.model, export)
  last = result.records[-1] if result.records else {}
  summary = {
    "out": args.out,
    "export": export,
    "steps": tc.steps,
    "resumed_from": result.resumed_from,
    "n_params": model.cfg.n_params,
    "loss": last.get("loss"),
    "eval_loss": last.get("eval_loss"),
    "eval_bpc": last.get("eval_bpc"),
    "wall_s": time.perf_counter() - t0,
  }
  if args.json:
    print(json.dumps(summary))
  else:
    bpc = "" if summary["eval_bpc"] is None else f", eval {summary['eval_bpc']:.3f} bits/char"
    loss = "" if summary["loss"] is None else f"loss {summary['loss']:.4f}{bpc}; "
    print(
      f"trained {model.cfg.n_params:,} params for {tc.steps} steps ({loss}"
      f"{summary['wall_s']:.1f} s); model exported to {export}",
      file=sys.stderr,
    )
  return 0


def add_export(sub) -> argparse.ArgumentParser:
  """`export`: a kept checkpoint of an LM run as a Hugging Face directory."""
  p = sub.add_parser(
    "export",
    help="write a kept checkpoint of an lm run as an HF directory",
    description="Writes checkpoint --step of the lm run in --run (a step kept "
    "in RUN/checkpoints, or 'best': the best validation checkpoint a "
    "--keep-best run kept) as a Hugging Face directory that kvjax and "
    "transformers load.",
  )
  p.add_argument(
    "--run", required=True, dest="run_dir", metavar="DIR", help="the lm run's --out directory"
  )
  p.add_argument(
    "--step", required=True, type=step_type, metavar="{N,best}", help="a kept step, or best"
  )
  p.add_argument("--out", metavar="DIR", help="where to write it (default RUN/model-STEP)")
  p.add_argument("--json", action="store_true", help="print a JSON summary")
  p.set_defaults(run=run_export, check=lambda args: check_export(p, args))
  return p


def check_export(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """--run is a directory and --out can be written."""
  if not os.path.isdir(args.run_dir):
    why = "not a directory" if os.path.exists(args.run_dir) else "no such directory"
    parser.error(f"--run {args.run_dir}: {why}")
  check_output(parser, "--out", args.out, directory=True)


def step_type(text: str):
  if text == "best":
    return text
  return checked(int, lambda v: v >= 1, "a step >= 1 or 'best'")(text)


def run_export(args: argparse.Namespace) -> int:
  from kvjax.train.lm import export

  out = args.out or os.path.join(args.run_dir, f"model-{args.step}")
  model = export(args.run_dir, args.step, out)
  summary = {"run": args.run_dir, "step": args.step, "out": out, "n_params": model.cfg.n_params}
  if args.json:
    print(json.dumps(summary))
  else:
    print(
      f"wrote step {args.step} of {args.run_dir} ({model.cfg.n_params:,} params) to {out}",
      file=sys.stderr,
    )
  return 0
