"""DroidSpeak on the bundled pair: sender `shakespeare`, receiver `shakespeare-comedy`.

    python benchmarks/droidspeak.py          # CPU, ~10 min on 2 cores

One run: first the offline profile (`kvjax.lm.droidspeak.profile.profile`) on the
validation comedy, As You Like It (4 windows, 512-token prefixes: the receiver's domain, where
its advantage over the sender is what a plan should keep; on the other validation plays the
comedy fine-tune's advantage is near zero and the kept share is noise), which gives the Pareto
front, the best KV-only plan [0, k) and the plans `profile.pick` chooses for >= 90% kept and
for >= 1.7x;
then, on the held-out comedy of the test split (The Comedy of Errors), --prompts windows per
prefix length in --prefix-lens, each a prefix the receiver reuses and --eval-tokens scored
tokens after it. Rows per prefix length:

  receiver full prefill      the receiver's own cache by the plan [0, L): every layer's K/V,
                             the top layer's attention and MLP skipped (nothing reads them);
                             the speedup baseline
  receiver lm prefill        `kvjax.lm.steps.prefill`, which also runs the top layer for the
                             last token's logits (what `lm.generate` pays)
  full KV reuse              every layer's K/V from the sender (plan none)
  KV reuse from layer k      recompute [0, k), reuse [k, L): the profile's best k
  DroidSpeak <plan>          each plan on the profile's Pareto front, and the two picks
  sender itself              the base model's own loss on the same text (no receiver)

Columns: the receiver's mean next-token loss over the scored tokens and in bits per character,
the share of the fine-tune's advantage over the sender kept ((loss_sender - loss) /
(loss_sender - loss_full)), greedy agreement of --new-tokens continuation tokens with the full
prefill's, the receiver's prefill time (median of --repeats, mean over the windows) and the
speedup over the receiver's full prefill (the first row). Writes <out>/droidspeak_<backend>.json
and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import numpy as np
import report

from kvjax import lm
from kvjax.lm import droidspeak as ds
from kvjax.lm.cli import positive
from kvjax.lm.droidspeak import profile as run


def comedy(split: str) -> str:
  """The one comedy of a split: As You Like It (validation), The Comedy of Errors (test)."""
  from kvjax.train import corpus

  docs = corpus.read_documents("shakespeare")
  splits = corpus.assign_splits(docs)
  (doc,) = [d for d in docs if d.genre == "comedy" and splits[d.path] == split]
  return doc.text


def best_kv_only(prof: dict, L: int) -> ds.Plan:
  """The fastest [0, k) plan (0 < k < L) keeping >= 90% of the advantage, else the best one."""
  rows = {r["plan"]: r for r in prof["rows"]}
  cands = [rows[str(ds.Plan.kv_from(k, L))] for k in range(1, L)]
  ok = [r for r in cands if r["advantage_kept"] >= 0.9]
  pick = (
    min(ok, key=lambda r: r["prefill_s_reuse"]) if ok else min(cands, key=lambda r: r["loss_reuse"])
  )
  return ds.Plan.parse(pick["plan"], L)


def bits_per_char(model, tail: list[int], loss: float) -> float:
  chars = len(model.tokenizer.decode(tail[1:]))
  return loss * (len(tail) - 1) / math.log(2) / chars


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sender", default="shakespeare", help="dir or bundled name")
  p.add_argument("--receiver", default="shakespeare-comedy", help="dir or bundled name")
  p.add_argument(
    "--profile-windows", type=positive, default=4, help="validation windows the profile runs on"
  )
  p.add_argument(
    "--profile-prefix", type=positive, default=512, help="the profile windows' prefix length"
  )
  p.add_argument("--prefix-lens", default="256,512,1024")
  p.add_argument("--prompts", type=positive, default=4)
  p.add_argument("--eval-tokens", type=positive, default=64)
  p.add_argument("--new-tokens", type=positive, default=16)
  p.add_argument("--repeats", type=positive, default=5)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  sender, receiver = lm.load(args.sender), lm.load(args.receiver)
  L = receiver.cfg.n_layers
  print("profiling on the validation comedy ...", file=sys.stderr)
  prof = run.profile(
    sender,
    receiver,
    run.windows(
      receiver.tokenizer.encode(comedy("validation")),
      args.profile_windows,
      args.profile_prefix + args.eval_tokens + 1,
    ),
    eval_tokens=args.eval_tokens,
    max_new_tokens=args.new_tokens,
    repeats=3,
    progress=False,
  )
  plans = plans_to_measure(prof, L)
  ids = receiver.tokenizer.encode(comedy("test"))
  res = dict(machine=report.describe(), settings=vars(args), profile=prof, rows=[])
  for P in [int(x) for x in args.prefix_lens.split(",")]:
    res["rows"] += rows_at(
      sender, receiver, plans, run.windows(ids, args.prompts, P + args.eval_tokens + 1), P, args
    )
  report.publish(args.out, "droidspeak", res, markdown(res))
  return 0


def plans_to_measure(prof: dict, L: int) -> list[tuple[str, ds.Plan]]:
  """(row name, plan) of each measured plan: the receiver's full prefill first, full KV reuse,
  the best KV-only plan, then the profile's Pareto front and its picks."""
  kv = best_kv_only(prof, L)
  plans = [
    ("receiver full prefill", ds.Plan.full(L)),
    ("full KV reuse", ds.Plan.reuse_all(L)),
    (f"KV reuse from layer {kv.groups[0][1] if kv.groups else 0}", kv),
  ]
  picks = []
  for kw in (dict(min_kept=0.9), dict(min_speedup=1.7)):
    try:
      picks.append(run.pick(prof, **kw))
    except ValueError as err:
      print(f"  pick({kw}): {err}", file=sys.stderr)
  for p in list(prof["pareto"]) + picks:
    if p not in {str(q) for _, q in plans}:
      plans.append((f"DroidSpeak {p}", ds.Plan.parse(p, L)))
  return plans


def rows_at(sender, receiver, plans, prompts, P: int, args) -> list[dict]:
  """The table's rows for prefix length P over the windows `prompts`: the sender itself, each
  plan, and the receiver's lm prefill after its full prefill."""
  refs = [
    run.baseline(
      sender,
      receiver,
      w,
      eval_tokens=args.eval_tokens,
      max_new_tokens=args.new_tokens,
      repeats=args.repeats,
    )
    for w in prompts
  ]
  gain = np.mean([r.loss_sender - r.loss_full for r in refs])
  lm_s = float(np.mean([r.prefill_s for r in refs]))
  full_s = None  # the plan [0, L)'s prefill time, measured first
  sender_loss = float(np.mean([r.loss_sender for r in refs]))
  rows = [
    dict(
      method="sender itself",
      plan="",
      prefix=P,
      loss=sender_loss,
      bpc=float(np.mean([bits_per_char(sender, r.tail, r.loss_sender) for r in refs])),
      kept=0.0,
      agreement=None,
      prefill_ms=None,
      speedup=None,
    )
  ]
  for name, plan in plans:
    ms = [run.measure(sender, receiver, plan, r, repeats=args.repeats) for r in refs]
    loss = float(np.mean([m["loss_reuse"] for m in ms]))
    reuse_s = float(np.mean([m["prefill_s_reuse"] for m in ms]))
    full_s = full_s or reuse_s
    row = dict(
      method=name,
      plan=str(plan),
      prefix=P,
      loss=loss,
      bpc=float(
        np.mean([bits_per_char(receiver, r.tail, m["loss_reuse"]) for r, m in zip(refs, ms)])
      ),
      kept=float((sender_loss - loss) / gain) if gain > 0 else float("nan"),
      agreement=float(np.mean([m["agreement"] for m in ms])),
      prefill_ms=1e3 * reuse_s,
      speedup=full_s / reuse_s,
      full_prefill_ms=1e3 * full_s,
    )
    rows.append(row)
    if plan == ds.Plan.full(receiver.cfg.n_layers):
      rows.append(
        dict(
          method="receiver lm prefill",
          plan="",
          prefix=P,
          loss=float(np.mean([r.loss_full for r in refs])),
          bpc=row["bpc"],
          kept=1.0,
          agreement=1.0,
          prefill_ms=1e3 * lm_s,
          speedup=full_s / lm_s,
        )
      )
    print(
      f"  P={P} {name:28s} loss {loss:.4f} kept {row['kept']:.2f} "
      f"{row['prefill_ms']:.2f} ms {row['speedup']:.2f}x",
      file=sys.stderr,
    )
  return rows


def markdown(res) -> str:
  s = res["settings"]
  lines = [
    f"Machine: {res['machine']}. Sender `{s['sender']}`, receiver `{s['receiver']}` "
    f"(float32); {s['prompts']} windows of The Comedy of Errors (held out) per prefix "
    f"length; loss over the {s['eval_tokens']} tokens after the prefix; agreement over "
    f"{s['new_tokens']} greedy tokens; prefill: median of {s['repeats']}.",
    "",
    "| prefix | method | plan | loss (nats/token) | bits/char | advantage kept | "
    "agreement | prefill ms | speedup |",
    "|---:|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  fmt = lambda v, f: "" if v is None else format(v, f)
  for r in res["rows"]:
    lines.append(
      f"| {r['prefix']} | {r['method']} | {r['plan']} | {r['loss']:.4f} | "
      f"{r['bpc']:.3f} | {r['kept']:.2f} | {fmt(r['agreement'], '.2f')} | "
      f"{fmt(r['prefill_ms'], '.2f')} | "
      f"{'' if r['speedup'] is None else format(r['speedup'], '.2f') + 'x'} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
