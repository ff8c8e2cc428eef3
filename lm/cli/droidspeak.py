"""`kvjax droidspeak {run,send,receive}`: cross-model cache reuse from the command line.

    kvjax droidspeak run --sender shakespeare --receiver shakespeare-comedy --plan 0-1 \
        --prompt-file scene.txt --json
    kvjax droidspeak receive --receiver shakespeare-comedy --sender shakespeare \
        --prompt-file scene.txt --port 7000 &            # one process ...
    kvjax droidspeak send --sender shakespeare --plan 0-1 --prompt-file scene.txt --port 7000
                                                         # ... and another

A plan is comma-separated layer groups 'start-stop' (stop exclusive) that the receiver
recomputes, 'full' or 'none'. send ships the K/V (and E) of every prompt token but the last;
receive checks the payload against its own model, the expected sender and its own tokenization
of the prompt, prefills from it, feeds the last token and continues greedily.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kvjax.lm.cli.flags import add_value_flags, checked, dest, nonneg, port_type, positive
from kvjax.lm.cli.paths import check_input_file, check_output, output_error
from kvjax.lm.cli.text import read_text, text_type

DEFAULT_SENDER, DEFAULT_RECEIVER = "shakespeare", "shakespeare-comedy"
_fraction = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
_pos_float = checked(float, lambda v: v > 0, "a number > 0")


NAME = "droidspeak"
HELP = "reuse a sender model's KV/E cache in a fine-tuned receiver (DroidSpeak)"
DESCRIPTION = __doc__.split("\n")[0]
# (flag, type, default, metavar, help) of each action's settings
RUN_FLAGS = (
  (
    "--eval-tokens",
    positive,
    64,
    "E",
    "score the receiver on the prompt's last E tokens (default 64)",
  ),
  (
    "--max-new-tokens",
    nonneg,
    32,
    "N",
    "greedy tokens generated from the reused cache and compared with the full "
    "prefill's (default 32)",
  ),
  ("--repeats", positive, 5, None, "timed prefills (median)"),
)
PROFILE_FLAGS = (
  ("--prompts", positive, 4, None, "windows of the text (default 4)"),
  ("--prefix-tokens", positive, 512, "P", "reused prefix per window (default 512)"),
  ("--eval-tokens", positive, 64, "E", None),
  (
    "--max-new-tokens",
    nonneg,
    16,
    "N",
    "greedy tokens compared with the full prefill's (default 16)",
  ),
  ("--repeats", positive, 3, None, None),
  ("--unions", nonneg, 4, None, "pair up this many best single groups (default 4)"),
)
RECEIVE_FLAGS = (
  ("--timeout", positive, 120, None, "seconds to wait for a sender"),
  ("--max-new-tokens", nonneg, 32, "N", "greedy tokens generated after the prompt (default 32)"),
)


def add_flags(p: argparse.ArgumentParser) -> None:
  sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
  _add_run(sub)
  _add_profile(sub)
  _add_send(sub)
  _add_receive(sub)


def _add_run(sub) -> None:
  """`kvjax droidspeak run`: full prefill vs reuse under a plan, on one prompt."""
  r = sub.add_parser("run", help="full prefill vs reuse under a plan, on one prompt")
  _models(r, sender=True, receiver=True)
  _plan(r, auto=True)
  _prompt(r)
  add_value_flags(r, RUN_FLAGS)
  r.add_argument("--json", action="store_true", help="print one JSON object")
  r.set_defaults(run=_run, check=lambda args: _check(r, args))


def _add_profile(sub) -> None:
  """`kvjax droidspeak profile`: every single-group plan (and the best unions of two) on a
  text; the Pareto front."""
  f = sub.add_parser(
    "profile",
    help="measure every single-group plan (and the best unions of "
    "two) on a text; print the Pareto front",
  )
  _models(f, sender=True, receiver=True)
  f.add_argument(
    "--text", metavar="FILE", help="profiling text (default: the bundled corpus' validation plays)"
  )
  add_value_flags(f, PROFILE_FLAGS)
  f.add_argument(
    "--out",
    metavar="FILE",
    help="also write the profile here (default: the "
    "pair's stored profile, which --plan auto reads)",
  )
  f.add_argument("--no-progress", action="store_true", help="no progress bar")
  f.add_argument("--json", action="store_true", help="print the profile as one JSON object")
  f.set_defaults(run=_profile, check=lambda args: _check_profile(f, args))


def _add_send(sub) -> None:
  """`kvjax droidspeak send`: capture a prompt's prefix with the sender and ship it."""
  s = sub.add_parser("send", help="capture a prompt's prefix with the sender and ship it")
  _models(s, sender=True)
  _plan(s)
  _prompt(s)
  _where(s, "write the payload to FILE", "--out")
  s.add_argument("--json", action="store_true", help="print one JSON object")
  s.set_defaults(run=_send, check=lambda args: _check(s, args))


def _add_receive(sub) -> None:
  """`kvjax droidspeak receive`: take a payload, prefill from it and continue."""
  v = sub.add_parser("receive", help="take a payload, prefill from it and continue")
  _models(v, receiver=True)
  v.add_argument(
    "--sender",
    metavar="DIR_OR_NAME",
    default=None,
    help="refuse a payload from any other sender (checked by params fingerprint)",
  )
  _prompt(v)
  _where(v, "read the payload from FILE", "--in")
  add_value_flags(v, RECEIVE_FLAGS)
  v.add_argument("--json", action="store_true", help="print one JSON object")
  v.set_defaults(run=_receive, check=lambda args: _check(v, args))


def _models(p, sender=False, receiver=False):
  if sender:
    p.add_argument(
      "--sender",
      metavar="DIR_OR_NAME",
      default=DEFAULT_SENDER,
      help=f"the model whose cache is reused (default {DEFAULT_SENDER})",
    )
  if receiver:
    p.add_argument(
      "--receiver",
      metavar="DIR_OR_NAME",
      default=DEFAULT_RECEIVER,
      help=f"the fine-tune that reuses it (default {DEFAULT_RECEIVER})",
    )


def _plan(p, auto=False):
  p.add_argument(
    "--plan",
    required=True,
    metavar="PLAN",
    help="layer groups the receiver recomputes: 'start-stop,...' (stop exclusive), "
    "'full' or 'none'" + (", or 'auto': the stored profile's pick" if auto else ""),
  )
  if not auto:
    return
  p.add_argument(
    "--min-kept",
    type=_fraction,
    default=None,
    metavar="F",
    help="auto: the fastest plan keeping this share of the fine-tune's advantage (default 0.9)",
  )
  p.add_argument(
    "--min-speedup",
    type=_pos_float,
    default=None,
    metavar="X",
    help="auto: the best plan with at least this prefill speedup",
  )


def _prompt(p):
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", type=text_type, metavar="TEXT", help="the prompt text")
  g.add_argument("--prompt-file", metavar="FILE", help="UTF-8 text file")


def _where(p, file_help, flag):
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument(flag, dest="file", metavar="FILE", help=file_help)
  g.add_argument(
    "--port",
    type=port_type,
    help="loopback TCP port (receive: 0 = any free port, printed on stderr)",
  )
  p.add_argument("--host", default="127.0.0.1", type=text_type, help="TCP host (default 127.0.0.1)")


def _check_profile(parser, args) -> None:
  check_input_file(parser, "--text", args.text)
  check_output(parser, "--out", args.out, directory=False)


def _check(parser, args) -> None:
  plan = getattr(args, "plan", None)
  kept, speed = getattr(args, "min_kept", None), getattr(args, "min_speedup", None)
  if args.action == "send" and plan == "auto":
    parser.error("send --plan auto: give the plan (kvjax droidspeak run picks auto plans)")
  if (kept is not None or speed is not None) and plan != "auto":
    parser.error("--min-kept / --min-speedup only apply with --plan auto")
  if kept is not None and speed is not None:
    parser.error("give --min-kept or --min-speedup, not both")
  if args.prompt_file is not None:
    check_input_file(parser, "--prompt-file", args.prompt_file)
    try:
      args.prompt = read_text(args.prompt_file, "--prompt-file")
    except ValueError as err:
      parser.error(str(err))
  if args.action == "send":
    check_output(parser, "--out", args.file, directory=False)
  if args.action == "receive":
    check_input_file(parser, "--in", args.file)
  if not args.prompt.strip():
    parser.error("the prompt is empty")
  if args.action == "send" and args.port == 0:
    parser.error("send --port needs the receiver's port (>= 1)")


def _ids(model, text: str) -> list[int]:
  if model.tokenizer is None:
    raise ValueError(f"{model.path}: no tokenizer.json to encode the prompt")
  return model.tokenizer.encode(text)


def _plan_for(model, text: str):
  from kvjax.lm.droidspeak import Plan

  return Plan.parse(text, model.cfg.n_layers)


def _report(args, obj: dict, text: str | None = None, summary: str | None = None) -> int:
  """What an action prints: `obj` as one JSON object with --json, else its `text` on stdout and
  its `summary` line on stderr. Returns the exit code, 0."""
  if args.json:
    print(json.dumps(obj))
    return 0
  if text is not None:
    print(text)
  if summary is not None:
    print(summary, file=sys.stderr)
  return 0


def _run(args) -> int:
  from kvjax.lm.droidspeak import profile
  from kvjax.lm.model import load

  sender, receiver = load(args.sender), load(args.receiver)
  ids = _ids(receiver, args.prompt)
  if _ids(sender, args.prompt) != ids:
    raise ValueError(
      "sender and receiver tokenize the prompt differently: DroidSpeak needs one tokenizer"
    )
  if args.plan == "auto":
    prof = _stored_profile(sender, receiver)
    args.plan = profile.pick(prof, min_kept=args.min_kept, min_speedup=args.min_speedup)
    print(f"kvjax droidspeak: auto plan {args.plan}", file=sys.stderr)
  settings = {dest(flag): getattr(args, dest(flag)) for flag, *_ in RUN_FLAGS}
  r = profile.compare(sender, receiver, _plan_for(receiver, args.plan), ids, **settings)
  r["text"] = receiver.tokenizer.decode(r["tokens"])
  return _report(
    args,
    {"sender": args.sender, "receiver": args.receiver, **r},
    r["text"],
    f"kvjax droidspeak: plan {r['plan']} (recompute layers {r['recomputed_layers']}) over "
    f"a {r['prefix_tokens']}-token prefix: prefill {r['prefill_s_full'] * 1e3:.2f} ms full "
    f"vs {r['prefill_s_reuse'] * 1e3:.2f} ms reuse ({r['prefill_speedup']:.2f}x); loss "
    f"over the last {r['eval_tokens']} tokens {r['loss_full']:.4f} full vs "
    f"{r['loss_reuse']:.4f} reuse; greedy agreement {r['agreement']:.2f}",
  )


def _measure(sender, receiver, text: str, settings: dict, progress: bool) -> dict:
  """The pair's profile on `text` under `settings`, the values of the profile action's
  PROFILE_FLAGS by name."""
  from kvjax.lm.droidspeak import profile

  s = dict(settings)
  n, prefix_tokens = s.pop("prompts"), s.pop("prefix_tokens")
  ids = _ids(receiver, text)
  prompts = profile.windows(ids, n, prefix_tokens + s["eval_tokens"] + 1)
  return profile.profile(sender, receiver, prompts, progress=progress, **s)


def _check_writable(path: str, what: str) -> None:
  """ValueError naming `what` unless the profile file `path` can be written: found before the
  profiling, not after."""
  unwritable = output_error(path, directory=False)
  if unwritable:
    raise ValueError(f"{what} {path}: {unwritable}")


def _stored_profile(sender, receiver) -> dict:
  """The pair's stored profile, made once (as the profile action makes it with its default
  flags) on the bundled validation text when missing."""
  from kvjax.lm.droidspeak import profile

  path = profile.profile_path(sender, receiver)
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  _check_writable(path, "--plan auto: the pair's stored profile")
  print(
    f"kvjax droidspeak: no stored profile for this pair; profiling once on the bundled "
    f"validation text into {path}",
    file=sys.stderr,
  )
  defaults = {dest(flag): default for flag, _, default, *_ in PROFILE_FLAGS}
  prof = _measure(sender, receiver, validation_text(), defaults, progress=True)
  _write_json(path, prof)
  return prof


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def _profile(args) -> int:
  from kvjax.lm import droidspeak
  from kvjax.lm.droidspeak import profile
  from kvjax.lm.model import load

  sender, receiver = load(args.sender), load(args.receiver)
  droidspeak.check_pair(sender, receiver)
  stored = profile.profile_path(sender, receiver)
  _check_writable(stored, "the pair's stored profile")
  text = validation_text() if args.text is None else read_text(args.text)
  settings = {dest(flag): getattr(args, dest(flag)) for flag, *_ in PROFILE_FLAGS}
  prof = _measure(sender, receiver, text, settings, progress=not args.no_progress)
  prof.update(sender=args.sender, receiver=args.receiver, text=args.text or "bundled validation")
  for path in {stored, args.out or stored}:
    _write_json(path, prof)
  first = prof["rows"][0]
  return _report(
    args,
    prof,
    _table(prof),
    f"* Pareto front; full prefill {first['prefill_s_full'] * 1e3:.2f} ms, "
    f"sender loss {first['loss_sender']:.4f}; stored in {stored}",
  )


def _table(prof: dict) -> str:
  """A profile's rows as a markdown table, the Pareto front marked *."""
  lines = [
    "| plan | recomputed | prefill ms | speedup | loss | advantage kept | agreement |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in prof["rows"]:
    mark = " *" if r["plan"] in prof["pareto"] else ""
    lines.append(
      f"| {r['plan']}{mark} | {r['recomputed_fraction']:.2f} | "
      f"{r['prefill_s_reuse'] * 1e3:.2f} | {r['prefill_speedup']:.2f}x | "
      f"{r['loss_reuse']:.4f} | {r['advantage_kept']:.2f} | {r['agreement']:.2f} |"
    )
  return "\n".join(lines)


def _send(args) -> int:
  from kvjax.lm import droidspeak
  from kvjax.lm.droidspeak import payload, profile, wire
  from kvjax.lm.model import load

  sender = load(args.sender)
  ids = _ids(sender, args.prompt)
  if len(ids) < 2:
    raise ValueError(
      "the prompt needs at least 2 tokens (a prefix and the token the receiver feeds itself)"
    )
  tokens, lengths = profile.padded(ids[:-1])
  t0 = time.perf_counter()
  sent = droidspeak.capture(sender, tokens, lengths, _plan_for(sender, args.plan))
  data = payload.encode(sent, sender)
  capture_s = time.perf_counter() - t0
  if args.file is not None:
    payload.write(args.file, data)
  else:
    wire.send(data, args.port, args.host)
  where = args.file or f"{args.host}:{args.port}"
  summary = {
    "plan": str(sent.plan),
    "prefix_tokens": len(ids) - 1,
    "bytes": len(data),
    "to": where,
    "capture_s": capture_s,
  }
  return _report(
    args,
    summary,
    summary=f"kvjax droidspeak send: {len(data):,} bytes (plan {sent.plan}, "
    f"{len(ids) - 1}-token prefix) to {where}",
  )


def _receive(args) -> int:
  from kvjax.lm import droidspeak, steps
  from kvjax.lm.droidspeak import payload, profile, wire
  from kvjax.lm.model import load

  receiver = load(args.receiver)
  expected = payload.fingerprint(load(args.sender))["sender"] if args.sender else None
  ids = _ids(receiver, args.prompt)
  if args.file is not None:
    data = payload.read(args.file)
  else:

    def listening(port):
      print(
        f"kvjax droidspeak receive: listening on {args.host}:{port}", file=sys.stderr, flush=True
      )

    data = wire.serve_once(args.port, args.host, timeout=args.timeout, on_listen=listening)
  sent = payload.decode(data, receiver, sender=expected, prefix=[ids[:-1]])
  cache = droidspeak.receive(receiver, sent, size=steps.bucket(len(ids) + args.max_new_tokens))
  out = profile.continue_from(receiver, cache, ids[-1:], args.max_new_tokens)
  text = receiver.tokenizer.decode(out["tokens"])
  received = {
    "plan": str(sent.plan),
    "prefix_tokens": len(ids) - 1,
    "bytes": len(data),
    "recomputed_layers": list(sent.plan.recomputed),
    "tokens": out["tokens"],
    "text": text,
  }
  return _report(args, received, text)


def validation_text() -> str:
  """The bundled profiling text: the Shakespeare corpus' validation plays (never trained on
  by the bundled models), joined."""
  from kvjax.train import corpus

  docs = corpus.read_documents("shakespeare")
  split = corpus.assign_splits(docs)
  return "\n\n".join(d.text for d in docs if split[d.path] == "validation")
