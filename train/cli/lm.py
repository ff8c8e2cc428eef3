"""`python -m kvjax.train lm` (also `kvjax train lm`): train or fine-tune a Llama-style model."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from kvjax.lm import distributed
from kvjax.lm.cli.flags import (
  add_distributed_flags,
  nonneg,
  positive,
  start_distributed,
)
from kvjax.train.cli import common

HELP = "train or fine-tune a language model"
DESCRIPTION = """\
Settings come from flags, then `--config FILE` (a JSON object keyed by flag names with
underscores, e.g. {"d_model": 128, "bf16": true}), then the defaults. A run resumes from the
latest checkpoint in --out. At the end the model is exported as a Hugging Face directory
(--export, default OUT/model). Exit codes: 0 ok, 1 bad data/model/run, 2 bad flags."""
ARCH = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim")


ARCH_DEFAULTS = dict(d_model=128, n_layers=4, n_heads=4)  # only without --init-from


# The lm task's own defaults (the others: Config's rope_theta, common's, then TrainConfig's
# field defaults).
LM_DEFAULTS = dict(bos_rows=False)
DATA_FLAGS: tuple[common.Flag, ...] = (
  *common.SOURCE_FLAGS,
  (
    "--tokenizer",
    None,
    "DIR",
    "directory with tokenizer.json (default: --init-from's tokenizer; with "
    "--data, a BPE trained on the corpus' train split into OUT/tokenizer)",
  ),
  ("--vocab-size", int, "V", "--data without --tokenizer: BPE vocabulary size (default 4096)"),
  *common.GENRE_FLAGS,
  ("--eval-split", None, "SPLIT", "--data: eval split (default validation)"),
  (
    "--bos-rows",
    common.SWITCH,
    None,
    "--data: start every packed row with the tokenizer's BOS token, as real "
    "LMs are trained (default: rows start wherever the stream is)",
  ),
  (
    "--eval-fraction",
    common.fraction,
    "F",
    "--text: fraction of the text held out for eval (default 0.1)",
  ),
)
# The architecture of a new model (each an integer >= 1).
ARCH_FLAGS = (
  ("d_model", "model width (default 128; without --init-from)"),
  ("n_layers", "layers (default 4)"),
  ("n_heads", "query heads (default 4)"),
  ("n_kv_heads", "kv heads (default: --n-heads)"),
  ("head_dim", "head dimension (default: --d-model / --n-heads)"),
  ("ffn_dim", "MLP width (default 4 x --d-model)"),
  ("max_position", "the model's context (default and minimum: --seq-len)"),
)
MODEL_FLAGS: tuple[common.Flag, ...] = (
  *(("--" + name.replace("_", "-"), positive, "N", help_) for name, help_ in ARCH_FLAGS),
  ("--rope-theta", common.pos_float, "X", "RoPE base (default 10000)"),
  (
    "--init-from",
    None,
    "MODEL_DIR",
    "fine-tune this HF-format model (its architecture must match the flags)",
  ),
)


def lora_targets(text: str) -> tuple[str, ...]:
  """--lora-targets: comma-separated Linear names, e.g. q_proj,v_proj."""
  names = tuple(n.strip() for n in text.split(","))
  if not all(names):
    raise argparse.ArgumentTypeError(
      f"expected comma-separated names like q_proj,v_proj; got {text!r}"
    )
  return names


LORA_FLAGS: tuple[common.Flag, ...] = (
  (
    "--lora-rank",
    nonneg,
    "R",
    "with --init-from: train rank-R LoRA factors over its frozen weights and export a PEFT "
    "adapter (default 0: train every param)",
  ),
  ("--lora-alpha", common.pos_float, "A", "LoRA scale alpha / R (default 16)"),
  (
    "--lora-targets",
    lora_targets,
    "NAMES",
    "comma-separated Linear names to adapt (default: every attention and MLP projection: "
    "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; Phi-3's qkv_proj,o_proj,"
    "gate_up_proj,down_proj)",
  ),
)
OPTIMISATION_FLAGS: tuple[common.Flag, ...] = (
  ("--batch-size", positive, "B", "rows per step (default 16)"),
  ("--seq-len", positive, "T", "tokens per row (default 256)"),
  (
    "--steps",
    positive,
    "N",
    "optimizer steps in all; a resumed run continues up to it (default 1000)",
  ),
  ("--lr", common.pos_float, "LR", "peak learning rate (default 3e-3)"),
  ("--warmup", nonneg, "N", "linear warmup steps (default 100)"),
  common.FINAL_LR_FLAG,
  ("--weight-decay", common.nonneg_float, "WD", "AdamW weight decay (default 0.1)"),
  ("--clip-norm", common.pos_float, "C", "global gradient norm clip (default 1)"),
  ("--bf16", common.SWITCH, None, "bfloat16 compute (params and optimizer state stay float32)"),
  (
    "--dropout",
    common.fraction,
    "P",
    "residual dropout of every attention and MLP output while training (default 0)",
  ),
  (
    "--attn-dropout",
    common.fraction,
    "P",
    "dropout of the attention probabilities while training (default 0)",
  ),
  common.SEED_FLAG,
)
RUN_FLAGS: tuple[common.Flag, ...] = (
  ("--out", None, "DIR", "run directory (checkpoints, metrics, model)"),
  *common.SAVE_FLAGS,
  ("--eval-every", nonneg, "N", "eval period (0 = end only)"),
  (
    "--keep-best",
    common.SWITCH,
    None,
    "also keep the checkpoint of the best validation bits per character in "
    "OUT/best (export it with `train export --step best`)",
  ),
  (
    "--patience",
    nonneg,
    "N",
    "stop early after N evaluations without a better validation bits per "
    "character (0 = never; needs --eval-every)",
  ),
  common.LOG_EVERY_FLAG,
  (
    "--export",
    None,
    "DIR",
    "HF-format export directory (default OUT/model; a LoRA run's PEFT adapter: OUT/adapter)",
  ),
  ("--data-parallel", nonneg, "N", "mesh 'data' axis size (0 = all devices / --model-parallel)"),
  ("--model-parallel", positive, "N", "mesh 'model' axis size"),
  *common.OUTPUT_FLAGS,
)


def add_lm(sub) -> argparse.ArgumentParser:
  """The `lm` subcommand; every default is None so --config and the defaults can fill in
  (`check_lm`)."""
  p = common.add_task(sub, "lm", HELP, DESCRIPTION, run_lm, check_lm)
  common.add_flags(p.add_argument_group("data"), DATA_FLAGS)
  common.add_flags(p.add_argument_group("model (vocab_size comes from the tokenizer)"), MODEL_FLAGS)
  common.add_flags(p.add_argument_group("LoRA fine-tuning"), LORA_FLAGS)
  common.add_flags(p.add_argument_group("optimisation"), OPTIMISATION_FLAGS)
  common.add_flags(p.add_argument_group("run"), RUN_FLAGS)
  add_distributed_flags(p)
  return p


def check_lm(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Merges --config and the defaults into args; cross-flag rules (errors exit 2)."""
  from kvjax.lm.config import Config
  from kvjax.train.lm import TrainConfig

  common.settle(parser, args, {**LM_DEFAULTS, "rope_theta": Config.rope_theta}, TrainConfig)
  common.check_run_flags(parser, args, "checkpoints, metrics and the exported model")
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
  if args.lora_rank and args.init_from is None:
    parser.error("--lora-rank R fine-tunes a pretrained model: pass --init-from MODEL")
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


def run_lm(args: argparse.Namespace) -> int:
  """Trains, exports, prints a summary; returns 0."""
  from kvjax.lm.lora import write as write_adapter
  from kvjax.lm.model import save
  from kvjax.train.lm import TrainConfig, train

  t0 = time.perf_counter()
  start_distributed(args)
  tc = dataclasses.replace(common.run_config(TrainConfig, args), base=args.init_from or "")
  model = _model(args)
  batches, eval_batches = common.data_batches(args, model.tokenizer)
  result = train(model, tc, batches, eval_batches, progress=not args.no_progress)
  export = args.export or os.path.join(args.out, "adapter" if tc.lora_rank else "model")
  if distributed.is_main():
    if result.adapter is not None:
      write_adapter(export, result.adapter)
    else:
      save(result.model, export)
  n_params = model.cfg.n_params
  if result.adapter is not None:
    n_params = result.adapter.n_params
  summary = common.run_summary(
    args, t0, result, export, n_params, ("loss", "eval_loss", "eval_bpc")
  )
  bpc = "" if summary["eval_bpc"] is None else f", eval {summary['eval_bpc']:.3f} bits/char"
  loss = "" if summary["loss"] is None else f"loss {summary['loss']:.4f}{bpc}; "
  return common.finish(
    args,
    summary,
    f"trained {n_params:,} params for {tc.steps} steps ({loss}"
    f"{summary['wall_s']:.1f} s); {'adapter' if result.adapter else 'model'} exported to {export}",
  )
