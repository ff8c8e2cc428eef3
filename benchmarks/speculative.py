"""EAGLE speculative decoding on the bundled `shakespeare` model: acceptance and speedup.

    python benchmarks/speculative.py --draft DRAFT_DIR        # CPU; DRAFT_DIR: see below

Held-out prompts: --prompts windows of --prompt-len tokens from the test split's non-comedy
plays. Each configuration generates --new-tokens tokens per prompt at batch 1 (every prompt
in turn) and batch 4 (--prompts rows at once, 4 by default), temperature 0 and 1, one
warm-up run (compilation excluded) and --repeats measured runs (3; the median run is kept):

  vanilla  kvjax `lm.generate` (jitted prefill + one lax.while_loop of decode steps)
  chain    EAGLE-1 head, top_k 1 (chain drafting), depth --depth
  eagle1   EAGLE-2 dynamic tree with the EAGLE-1 head (--top-k, --depth, --tree-tokens)
  eagle3   the same tree with the EAGLE-3 head
  small    EAGLE-1 head with a small tree (--small-tree top_k,depth,tokens; default 4,3,8),
           the size that suits a CPU, where verifying 32 tokens costs several decode steps
  default  what `kvjax generate --speculative eagle --head H` runs with no tree flag: the
           tree `speculative.default_tree` measures on this machine at that temperature and
           batch (on max(2, batch) other held-out prompts), or plain decoding when no tree
           beat it by 5%
  hf       the peer: Hugging Face transformers assisted generation, the same target (float32,
           PyTorch eager) with `assistant_model` = a small draft LM trained with `kvjax train
           lm` on the same tokenizer (--draft); batch 1 only (transformers' assisted
           generation takes one row); its speedup is over transformers' own greedy/sampled
           `generate` of the same prompts, timed in the same run.

Speedup = decode time of vanilla / decode time of the row (kvjax: `stats["decode_s"]`, the
decode loop only; vanilla is measured first and again after the other rows, and the faster
of the two is the base, which guards against drift within a run; HF: whole `generate`
calls, both sides). Mean acceptance length = tokens per target forward, the bonus token
included (HF: new tokens / calls of the target's forward).
The draft model for the peer:

    kvjax train lm --data shakespeare --exclude-genre comedy --tokenizer lm/models/shakespeare \\
      --d-model 96 --n-layers 2 --n-heads 2 --ffn-dim 256 --max-position 2048 --seq-len 256 \\
      --batch-size 8 --steps 1200 --warmup 100 --lr 3e-3 --out draft   # -> draft/model

Writes <out>/speculative_<backend>.json and .md (the table, also printed).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import report

from kvjax import lm, speculative
from kvjax.lm.cli import positive
from kvjax.lm.sampling import Sampling

MODEL = "shakespeare"


def held_out_prompts(model, n: int, length: int) -> list[list[int]]:
  """n prompts of `length` tokens, one from each held-out non-comedy play (test split), taken
  from the middle of the play."""
  from kvjax.train import corpus

  docs = corpus.load_documents(corpus.builder(), "test", exclude_genres=["comedy"])
  out = []
  for i in range(n):
    ids = model.tokenizer.encode(docs[i % len(docs)].text)
    start = len(ids) // 2 + (i // len(docs)) * 4 * length
    out.append(ids[start : start + length])
  return out


def run_kvjax(
  model, head, prompts, batch, sampling, args, tree, *, stop_tokens=(), warmup: int | None = None
):
  """Generates every prompt (in rows of `batch`) once to warm up and args.repeats times
  measured -> (the median run's figures, its tokens: one list per prompt). stop_tokens: ()
  makes every row args.new_tokens long; None ends rows at the model's own stop tokens.
  warmup: the prompts the warm-up pass generates (the first ones; None: all). Compilation is
  never in the timed figures (`stats["decode_s"]` excludes it), so one batch of rows warms up
  what a whole pass would, bar the programs of other prompt-length buckets."""

  def once(seed, prompts=prompts):
    decode_s, new, proposed, rounds, forwards, tokens = 0.0, 0, 0.0, 0, 0, []
    for i in range(0, len(prompts), batch):
      rows = prompts[i : i + batch]
      kw = dict(
        max_new_tokens=args.new_tokens,
        sampling=sampling,
        stop_tokens=stop_tokens,
        key=jax.random.key(seed + i),
      )
      if head is None:
        out = lm.generate(model, rows, **kw)
        # one decode step per token of the longest row (the prefill's is not timed)
        forwards += max(map(len, out.tokens))
      else:
        out = speculative.generate(model, head, rows, tree=tree, **kw)
        r = sum(out.stats["rounds_per_row"])
        proposed += out.stats["mean_accept_len"] * r
        rounds += r
        forwards += out.stats["target_forwards"]
      decode_s += out.stats["decode_s"]
      new += out.stats["new_tokens"]
      tokens += out.tokens
    figures = dict(
      decode_s=decode_s,
      new_tokens=new,
      tokens_per_s=new / decode_s,
      mean_accept_len=proposed / rounds if rounds else None,
      target_forwards=forwards,
      ms_per_forward=1e3 * decode_s / forwards,
    )
    return figures, tokens

  once(0, prompts[:warmup])
  runs = sorted((once(1 + r) for r in range(args.repeats)), key=lambda r: r[0]["decode_s"])
  return runs[len(runs) // 2]


def run_hf(target, draft, prompts, sampling, args):
  """transformers assisted generation (batch 1) and plain generate, the same prompts."""
  import torch

  calls = {"n": 0}
  forward = target.forward

  def counted(*a, **k):
    calls["n"] += 1
    return forward(*a, **k)

  target.forward = counted
  kw = dict(
    max_new_tokens=args.new_tokens,
    min_new_tokens=args.new_tokens,
    do_sample=not sampling.greedy,
    pad_token_id=0,
  )
  if not sampling.greedy:
    kw.update(temperature=sampling.temperature, top_k=0)

  def once(assisted):
    t, new = 0.0, 0
    calls["n"] = 0
    for i, p in enumerate(prompts):
      torch.manual_seed(i)
      ids = torch.tensor([p])
      t0 = time.perf_counter()
      with torch.inference_mode():
        out = target.generate(ids, assistant_model=draft if assisted else None, **kw)
      t += time.perf_counter() - t0
      new += out.shape[1] - ids.shape[1]
    return dict(decode_s=t, new_tokens=new, tokens_per_s=new / t, forwards=calls["n"])

  res = {}
  for assisted in (False, True):
    once(assisted)
    res["assisted" if assisted else "plain"] = once(assisted)
  a = res["assisted"]
  a["mean_accept_len"] = a["new_tokens"] / max(a["forwards"], 1)
  target.forward = forward
  return res


def markdown(res) -> str:
  lines = [
    f"Machine: {res['machine']}. Target `{res['settings']['model']}` (float32); "
    f"{res['prompts']} held-out prompts of {res['prompt_len']} tokens, "
    f"{res['new_tokens']} new tokens each; tree "
    f"top_k {res['tree']['top_k']}, depth {res['tree']['depth']}, "
    f"{res['tree']['total_tokens']} tokens; chain depth {res['tree']['depth']}.",
    "",
    "| method | batch | temperature | mean accept len | ms per target forward | "
    "decode tok/s | speedup |",
    "|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in res["rows"]:
    acc = "" if r.get("mean_accept_len") is None else f"{r['mean_accept_len']:.2f}"
    ms = "" if r.get("ms_per_forward") is None else f"{r['ms_per_forward']:.2f}"
    lines.append(
      f"| {r['method']} | {r['batch']} | {r['temperature']:g} | {acc} | {ms} | "
      f"{r['tokens_per_s']:.1f} | {r['speedup']:.2f}x |"
    )
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--model",
    default=MODEL,
    help=f"target (dir or bundled name; default {MODEL}, the shipped heads' target)",
  )
  p.add_argument("--head1", default="shakespeare", help="EAGLE-1 head (dir or shipped name)")
  p.add_argument("--head3", default="shakespeare-eagle3", help="EAGLE-3 head")
  p.add_argument("--draft", default=None, help="draft LM directory for the HF peer (none: skip)")
  p.add_argument("--prompts", type=positive, default=4)
  p.add_argument("--prompt-len", type=positive, default=64)
  p.add_argument("--new-tokens", type=positive, default=96)
  p.add_argument("--batches", default="1,4")
  p.add_argument(
    "--repeats", type=positive, default=3, help="measured runs per row (the median is kept)"
  )
  p.add_argument("--temperatures", default="0,1")
  p.add_argument("--top-k", type=positive, default=8)
  p.add_argument("--depth", type=positive, default=5)
  p.add_argument("--tree-tokens", type=positive, default=32)
  p.add_argument("--small-tree", default="4,3,8", help="top_k,depth,tokens of the small tree")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  return p.parse_args(argv)


def methods(model, args, tree: speculative.TreeSpec) -> list[tuple]:
  """(row name, head or None for vanilla decoding, draft tree) of each kvjax row; tree: the
  main draft tree (--top-k, --depth, --tree-tokens)."""
  chain = speculative.TreeSpec(top_k=1, depth=args.depth, total_tokens=args.depth + 1)
  k, d, n = (int(x) for x in args.small_tree.split(","))
  small = speculative.TreeSpec(top_k=k, depth=d, total_tokens=n)
  eagle1 = speculative.load_head(args.head1, model)
  eagle3 = speculative.load_head(args.head3, model)
  return [
    ("kvjax vanilla decode", None, None),
    ("chain drafting, EAGLE-1 head", eagle1, chain),
    ("EAGLE-2 tree, EAGLE-1 head", eagle1, tree),
    ("EAGLE-2 tree, EAGLE-3 head", eagle3, tree),
    (f"EAGLE-2 small tree ({k}/{d}/{n}), EAGLE-1 head", eagle1, small),
  ]


def default_row(model, head, args, sampling: Sampling, batch: int) -> tuple:
  """The row `kvjax generate --speculative eagle --head H` gives with no tree flag at this
  sampling and batch: the tree `speculative.default_tree` measures for this machine (timed
  here afresh, in a temporary cache, on max(2, batch) held-out prompts other than the
  measured ones, in rows of `batch`), or plain decoding when no tree was faster."""
  import tempfile

  # distinct rows: a batch of copies accepts alike and flatters the tree
  n = max(2, batch)
  timing = held_out_prompts(model, args.prompts + n, args.prompt_len)[args.prompts :]
  with tempfile.TemporaryDirectory() as root:
    tree = speculative.default_tree(model, head, timing, sampling=sampling, batch=batch, root=root)
  if tree is None:
    return ("default flags (measured: plain decoding), EAGLE-1 head", None, None)
  name = f"{tree.top_k}/{tree.depth}/{tree.total_tokens}"
  return (f"default flags (measured tree {name}), EAGLE-1 head", head, tree)


def hf_row(hf, prompts, sampling, args) -> dict:
  """The HF assisted-generation peer's row (batch 1), its speedup over HF's plain generate."""
  h = run_hf(*hf, prompts, sampling, args)
  a = h["assisted"]
  return dict(
    method="HF assisted generation (peer)",
    batch=1,
    temperature=sampling.temperature,
    mean_accept_len=a["mean_accept_len"],
    tokens_per_s=a["tokens_per_s"],
    decode_s=a["decode_s"],
    ms_per_forward=1e3 * a["decode_s"] / max(a["forwards"], 1),
    speedup=h["plain"]["decode_s"] / a["decode_s"],
    hf_plain_tokens_per_s=h["plain"]["tokens_per_s"],
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  model = lm.load(args.model)
  prompts = held_out_prompts(model, args.prompts, args.prompt_len)
  tree = speculative.TreeSpec(top_k=args.top_k, depth=args.depth, total_tokens=args.tree_tokens)
  rows = methods(model, args, tree)
  res = dict(
    machine=report.describe(),
    prompts=len(prompts),
    prompt_len=args.prompt_len,
    new_tokens=args.new_tokens,
    tree=dict(top_k=tree.top_k, depth=tree.depth, total_tokens=tree.total_tokens),
    settings=vars(args),
    rows=[],
  )
  hf = None
  if args.draft:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
    hf = (load(model.path), load(args.draft))
  for temp in [float(t) for t in args.temperatures.split(",")]:
    sampling = Sampling(temperature=temp)
    for batch in [int(b) for b in args.batches.split(",")]:
      default = default_row(model, rows[1][1], args, sampling, batch)
      runs = [*rows, default]
      got = [run_kvjax(model, h, prompts, batch, sampling, args, spec)[0] for _, h, spec in runs]
      # plain decoding again, last: the faster of its two runs is the base (drift guard)
      again = run_kvjax(model, None, prompts, batch, sampling, args, None)[0]
      got[0] = min(got[0], again, key=lambda r: r["decode_s"])
      for (method, _, _), r in zip(runs, got, strict=True):
        r.update(method=method, batch=batch, temperature=temp)
        r["speedup"] = got[0]["decode_s"] / r["decode_s"]
        res["rows"].append(r)
        print(
          f"  T={temp:g} B={batch} {method:40s} accept {r['mean_accept_len'] or 0:.2f} "
          f"{r['tokens_per_s']:8.1f} tok/s {r['speedup']:.2f}x",
          file=sys.stderr,
        )
      if hf and batch == 1:
        res["rows"].append(hf_row(hf, prompts, sampling, args))
        print(f"  T={temp:g} B=1 HF assisted: {res['rows'][-1]}", file=sys.stderr)
  report.publish(args.out, "speculative", res, markdown(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
