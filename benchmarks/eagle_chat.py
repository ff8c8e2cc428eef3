"""EAGLE on a chat model: a trained head against plain kvjax decoding on held-out chat prompts.

    python benchmarks/eagle_chat.py --model smollm2-135m-instruct \\
      --head smollm2-135m-instruct-eagle3

Prompts: the first --prompts lines of benchmarks/prompts/eagle_chat_heldout.txt (48 user turns
written for this benchmark; tests/project/test_benchmarks.py checks that none resembles a
training prompt of `kvjax.train.instructions`), each a user turn in the model's chat template
(plain text for a model without one). Every prompt generates up to --new-tokens tokens, ending at
the model's stop tokens as a user's chat does, at each batch (--batches, rows of consecutive
prompts) and temperature (--temperatures), a warm-up run of the first batch (decode times
exclude compilation) and --repeats measured runs (the median kept):

  plain    kvjax `lm.generate` (jitted prefill + one lax.while_loop of decode steps)
  eagle2   the EAGLE-2 dynamic tree (--top-k, --depth, --tree-tokens)
  best     the fastest shape `speculative.default_tree` measures on this machine at that
           temperature and batch (`kvjax generate --speculative eagle` without tree flags;
           chains and trees, timed here afresh on max(--timing-prompts, batch) other held-out
           prompts), or plain decoding when none beats it by 5%

--methods picks the rows beside plain decoding (default both). Speedup = plain decode time /
the row's (`stats["decode_s"]`, decode loops only, prefill and compilation excluded). Mean
accepted length = tokens per target forward, the bonus token included.
`identical` (temperature 0): every row's tokens equal plain greedy decoding's.

Writes <out>/eagle_chat_<model>_<backend>.json and .md (the table, also printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import report

from kvjax import lm, speculative
from kvjax.lm.cli import positive
from kvjax.lm.sampling import Sampling
from speculative import run_kvjax  # benchmarks/speculative.py: one row's timed runs

PROMPTS = os.path.join(
  os.path.dirname(os.path.abspath(__file__)), "prompts", "eagle_chat_heldout.txt"
)


def read_prompts(path: str = PROMPTS) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def encode(model, text: str) -> list[int]:
  """A user turn in the model's chat template (the assistant's turn opened), or the text."""
  tok = model.tokenizer
  if tok.chat_template:
    text = tok.apply_chat_template([{"role": "user", "content": text}])
    return tok.encode(text, add_special_tokens=False)
  return tok.encode(text)


def best_tree(model, head, args, sampling, batch: int) -> speculative.TreeSpec | None:
  """`speculative.default_tree` measured afresh (a temporary cache) on the timing prompts in
  rows of `batch`; each shape's measured speed goes to stderr."""
  texts = read_prompts(args.prompt_file)
  n = max(args.timing_prompts, batch)  # distinct rows: copies accept alike, flattering trees
  timing = [encode(model, t) for t in texts[args.prompts : args.prompts + n]]
  if len(timing) < n:
    raise SystemExit(
      f"--prompts {args.prompts} leaves {len(timing)} prompts of {args.prompt_file} to time "
      f"batch {batch}; {n} needed"
    )
  with tempfile.TemporaryDirectory() as root:
    return speculative.default_tree(
      model,
      head,
      timing,
      root=root,
      batch=batch,
      sampling=None if sampling.greedy else sampling,
      log=lambda line: print(f"  {line}", file=sys.stderr),
    )


def markdown(res) -> str:
  t = res["tree"]
  lines = [
    f"Machine: {res['machine']}. Target `{res['model']}`, head `{res['head']}`; "
    f"{res['prompts']} held-out chat prompts, up to {res['new_tokens']} new tokens each; "
    f"EAGLE-2 tree top_k {t['top_k']}, depth {t['depth']}, {t['total_tokens']} tokens.",
    "",
    "| method | batch | temperature | mean accept len | decode tok/s | speedup | identical |",
    "|---|---:|---:|---:|---:|---:|---|",
  ]
  for r in res["rows"]:
    acc = "" if r["mean_accept_len"] is None else f"{r['mean_accept_len']:.2f}"
    same = "" if r["identical"] is None else ("yes" if r["identical"] else "NO")
    lines.append(
      f"| {r['method']} | {r['batch']} | {r['temperature']:g} | {acc} | "
      f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x | {same} |"
    )
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="smollm2-135m-instruct", help="target (dir or name)")
  p.add_argument("--head", default="smollm2-135m-instruct-eagle3", help="head (dir or name)")
  p.add_argument("--prompt-file", default=PROMPTS, help="one user turn per line")
  p.add_argument("--prompts", type=positive, default=40, help="measured prompts (the first N)")
  p.add_argument(
    "--timing-prompts", type=positive, default=2, help="the best tree's (at least the batch)"
  )
  p.add_argument("--new-tokens", type=positive, default=128)
  p.add_argument("--batches", default="1,4,8")
  p.add_argument("--repeats", type=positive, default=3, help="measured runs (the median is kept)")
  p.add_argument("--temperatures", default="0,0.7")
  p.add_argument("--top-k", type=positive, default=8)
  p.add_argument("--depth", type=positive, default=5)
  p.add_argument("--tree-tokens", type=positive, default=32)
  p.add_argument(
    "--methods",
    default="eagle2,best",
    help="comma-separated rows beside plain decoding (always run: the base): eagle2,best",
  )
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  args.methods = [m for m in args.methods.split(",") if m]
  if not args.methods or not set(args.methods) <= {"eagle2", "best"}:
    p.error(f"--methods takes eagle2 and/or best, comma-separated; got {','.join(args.methods)!r}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  model = lm.load(args.model)
  head = speculative.load_head(args.head, model)
  texts = read_prompts(args.prompt_file)
  if len(texts) < args.prompts:
    raise SystemExit(f"{args.prompt_file} holds {len(texts)} prompts; --prompts is {args.prompts}")
  prompts = [encode(model, t) for t in texts[: args.prompts]]
  eagle2 = speculative.TreeSpec(top_k=args.top_k, depth=args.depth, total_tokens=args.tree_tokens)
  res = dict(
    machine=report.describe(),
    model=args.model,
    head=args.head,
    prompts=len(prompts),
    new_tokens=args.new_tokens,
    tree=dict(top_k=eagle2.top_k, depth=eagle2.depth, total_tokens=eagle2.total_tokens),
    settings=vars(args),
    rows=[],
  )
  for temp in [float(t) for t in args.temperatures.split(",")]:
    sampling = Sampling(temperature=temp)
    for batch in [int(b) for b in args.batches.split(",")]:
      methods = [("plain decoding", None, None)]
      if "eagle2" in args.methods:
        methods.append(("EAGLE-2 tree", head, eagle2))
      if "best" in args.methods:
        best = best_tree(model, head, args, sampling, batch)
        shape = (
          "plain decoding" if best is None else f"{best.top_k}/{best.depth}/{best.total_tokens}"
        )
        methods.append((f"best measured shape ({shape})", None if best is None else head, best))
      base = plain = None
      for method, h, tree in methods:
        r, tokens = run_kvjax(
          model, h, prompts, batch, sampling, args, tree, stop_tokens=None, warmup=batch
        )
        base, plain = base or r["decode_s"], plain or tokens
        r.update(
          method=method,
          batch=batch,
          temperature=temp,
          speedup=base / r["decode_s"],
          identical=(tokens == plain) if sampling.greedy else None,
        )
        res["rows"].append(r)
        print(
          f"  T={temp:g} B={batch} {method:36s} accept {r['mean_accept_len'] or 0:.2f} "
          f"{r['tokens_per_s']:8.1f} tok/s {r['speedup']:.2f}x",
          file=sys.stderr,
        )
  name = os.path.basename(os.path.normpath(args.model))
  report.publish(args.out, f"eagle_chat_{name}", res, markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
