"""`kvjax generate`: generation with the lm core, EAGLE speculative decoding (--head) or a
coprocessor (--coprocessor)."""

from __future__ import annotations

import argparse
import json
import sys

from kvjax.lm.cli.flags import (
  PROG,
  add_coprocessor_group,
  add_distributed_flags,
  add_model_flag,
  add_other_params_flag,
  add_sampling_flags,
  add_speculative_flags,
  check_coprocessor,
  check_sampling_flags,
  check_speculative_flags,
  finite,
  load_model,
  nonneg,
  positive,
  sampling_kwargs,
  speculative_tree,
  start_distributed,
)
from kvjax.lm.cli.text import read_prompts, text_type

NAME = "generate"
HELP = "continue one or more prompts"
DESCRIPTION = (
  "Generates a continuation of each prompt (several --prompt flags run as one "
  "batch). Greedy unless --temperature > 0. One prompt streams its text as it is produced."
)


def add_flags(p: argparse.ArgumentParser) -> None:
  add_model_flag(p, chat=True)
  p.add_argument(
    "--prompt",
    action="append",
    type=text_type,
    required=True,
    metavar="TEXT",
    help="prompt text; repeat for a batch; '-' reads it from stdin",
  )
  p.add_argument(
    "--max-new-tokens",
    type=positive,
    default=64,
    metavar="N",
    help="tokens to generate per prompt at most (default 64)",
  )
  add_sampling_flags(p)
  add_speculative_flags(p)
  _add_coprocessor_flags(p)
  add_other_params_flag(p, "a head or coprocessor")
  p.add_argument(
    "--json",
    action="store_true",
    help="print one JSON object (texts, token ids, timings) instead of text",
  )
  _add_sharding_flags(p)
  add_distributed_flags(p)
  p.set_defaults(run=_generate, check=lambda args: _check_generate(p, args))


def _add_coprocessor_flags(p: argparse.ArgumentParser) -> None:
  """--coprocessor and its --delay."""
  g = add_coprocessor_group(
    p,
    "cache augmentation (a trained coprocessor writes latents into the "
    "cache before the prompt's last token)",
    "coprocessor directory (coprocessor.json + params/) or shipped name (e.g. shakespeare-16)",
  )
  g.add_argument(
    "--delay",
    type=nonneg,
    default=None,
    metavar="K",
    help="the latents arrive K tokens late (asynchronous augmentation; default 0)",
  )


def _add_sharding_flags(p: argparse.ArgumentParser) -> None:
  """--data-parallel, --model-parallel: the mesh of plain generation."""
  g = p.add_argument_group("sharding (plain generation: not with --speculative, --coprocessor)")
  g.add_argument(
    "--data-parallel",
    type=positive,
    default=None,
    metavar="N",
    help="mesh 'data' axis size (prompts split across it; default: all devices "
    "/ --model-parallel when sharding)",
  )
  g.add_argument(
    "--model-parallel",
    type=positive,
    default=None,
    metavar="N",
    help="mesh 'model' axis size (heads, ffn, vocab split across it; default 1)",
  )


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Cross-flag rules that argparse types cannot express."""
  check_sampling_flags(parser, args)
  if args.prompt.count("-") > 1:
    parser.error("--prompt - (read stdin) can be given only once")
  check_speculative_flags(parser, args)
  if args.delay is not None and args.coprocessor is None:
    parser.error("--delay applies only with --coprocessor")
  if args.coprocessor is not None and args.speculative:
    parser.error(
      "--coprocessor and --speculative do not combine (the EAGLE head drafts from "
      "an unaugmented cache)"
    )
  if args.coprocessor is not None:
    check_coprocessor(parser, args)
    if (args.delay or 0) >= args.max_new_tokens:
      parser.error(
        f"--delay {args.delay} must be smaller than --max-new-tokens {args.max_new_tokens}"
      )
  sharded = [
    f
    for f in (
      "data_parallel",
      "model_parallel",
      "coordinator",
      "num_processes",
      "process_id",
      "distributed",
    )
    if getattr(args, f) not in (None, False)
  ]
  if sharded and (args.speculative or args.coprocessor is not None):
    parser.error(
      f"--{sharded[0].replace('_', '-')} applies only to plain generation (not "
      "--speculative or --coprocessor)"
    )


def _generate(args: argparse.Namespace) -> int:
  prompts = read_prompts(args.prompt)
  multi = start_distributed(args)
  model = load_model(args)
  if multi or args.data_parallel or args.model_parallel:
    import jax

    from kvjax.lm import sharding

    model_ways = args.model_parallel or 1
    data = args.data_parallel or max(1, len(jax.devices()) // model_ways)
    if data * model_ways > len(jax.devices()):
      raise ValueError(
        f"--data-parallel {data} x --model-parallel {model_ways} needs "
        f"{data * model_ways} devices; {len(jax.devices())} available"
      )
    mesh = sharding.make_mesh(data, model_ways, jax.devices()[: data * model_ways])
    model = sharding.shard(model, mesh)
  kwargs = sampling_kwargs(args)
  if args.speculative:
    from kvjax import speculative

    head = speculative.load_head(args.head, model, allow_other_params=args.allow_other_params)
    args.tree = speculative_tree(
      args, model, head, prompts, chat=args.chat, sampling=kwargs["sampling"]
    )
  if args.tree is not None:
    out = speculative.generate(model, head, prompts, tree=args.tree, **kwargs)
  elif args.coprocessor is not None:
    from kvjax import coprocessor

    cop = coprocessor.load(args.coprocessor, model, allow_other_params=args.allow_other_params)
    out = coprocessor.generate(model, cop, prompts, delay=args.delay or 0, **kwargs)
  elif len(prompts) == 1 and not args.json and not multi and not args.speculative:
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
  print(
    f"{PROG}: {len(prompts)} prompts, {s['prompt_tokens']} prompt tokens, "
    f"prefill {s['prefill_s']:.3f} s; {s['new_tokens']} new tokens in {s['decode_s']:.3f} s "
    f"({s['decode_tokens_per_s']:.1f} tok/s); compile {s['compile_s']:.2f} s"
    + (
      f"; {s['mean_accept_len']:.2f} tokens per target forward ({s['target_forwards']} forwards)"
      if args.tree is not None
      else "; plain decoding (the measured default: no tree is faster here)"
      if args.speculative
      else ""
    ),
    file=sys.stderr,
  )
  return 0


def _preview(prompt: str, width: int = 60) -> str:
  """A prompt shortened to one header-line-sized repr."""
  text = repr(prompt)
  return text if len(text) <= width else text[: width - 3] + "..."


def _stream_one(model, prompt: str, kwargs: dict) -> int:
  """Writes the continuation to stdout as it is produced, then a newline; timings to stderr."""
  from kvjax.lm.generate import generate_iter

  stats: dict = {}
  for piece in generate_iter(model, prompt, stats=stats, **kwargs):
    sys.stdout.write(piece)
    sys.stdout.flush()
  sys.stdout.write("\n")
  sys.stdout.flush()
  print(
    f"{PROG}: {stats['prompt_tokens']} prompt tokens, prefill {stats['prefill_s']:.3f} s; "
    f"{stats['new_tokens']} new tokens in {stats['decode_s']:.3f} s "
    f"({stats['decode_tokens_per_s']:.1f} tok/s, {stats['finish']}); "
    f"compile {stats['compile_s']:.2f} s",
    file=sys.stderr,
  )
  return 0


def _generation_json(args: argparse.Namespace, model, out, sampling) -> dict:
  """The --json object of `kvjax generate`."""
  s = out.stats
  return (
    {
      "model": args.model,
      "dtype": str(model.dtype),
      "text": out.texts,
      "tokens": out.tokens,
      "prompt_tokens": out.prompt_tokens,
      "finish": out.finish,
      "prefill_s": finite(s["prefill_s"]),
      "decode_s": finite(s["decode_s"]),
      "compile_s": finite(s["compile_s"]),
      "decode_tokens_per_s": finite(s["decode_tokens_per_s"]),
      "new_tokens": int(s["new_tokens"]),
      "max_new_tokens": args.max_new_tokens,
      "temperature": sampling.temperature,
      "top_k": sampling.top_k,
      "top_p": sampling.top_p,
      "seed": None if sampling.greedy else args.seed,
      "stop": list(args.stop),
      "chat": args.chat,
    }
    | (
      {}
      if not args.speculative
      else {
        "speculative": args.speculative,
        "head": args.head,
        "tree": None
        if args.tree is None
        else {
          "top_k": args.tree.top_k,
          "depth": args.tree.depth,
          "total_tokens": args.tree.total_tokens,
        },
        "mean_accept_len": None if args.tree is None else finite(s["mean_accept_len"]),
        "target_forwards": None if args.tree is None else int(s["target_forwards"]),
      }
    )
    | (
      {}
      if args.coprocessor is None
      else {
        "coprocessor": args.coprocessor,
        "delay": args.delay or 0,
      }
    )
  )
