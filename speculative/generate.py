"""Speculative generation with an EAGLE head: the `lm.generate` of speculative decoding.

    from kvjax import lm, speculative
    model = lm.load("shakespeare")
    head = speculative.load_head("shakespeare", model)
    out = speculative.generate(model, head, ["ROMEO:"], max_new_tokens=64)
    out.stats["mean_accept_len"]

Greedy output equals `lm.generate`'s token for token; sampled output has the target's
distribution exactly (`kvjax.speculative.accept`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.lm import steps
from kvjax.lm.detokenize import outputs
from kvjax.lm.engine import Prompt, Request, check_context, check_finite, new_cache, pad, request
from kvjax.lm.generate import Generation
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.lm.stats import decode_stats
from kvjax.speculative import decoding
from kvjax.speculative import head as heads
from kvjax.speculative.tree import TreeSpec


def sizes(prompt_len: int, max_new_tokens: int, spec: TreeSpec) -> tuple[int, int, int]:
  """(padded prompt P, target cache slots, head cache slots) for a batch."""
  P = steps.bucket(prompt_len)
  reach = prompt_len + max_new_tokens + spec.depth + 1
  return (
    P,
    steps.bucket(max(P, reach)),
    steps.bucket(max(P, reach, prompt_len + max_new_tokens + spec.draft_slots)),
  )


def generate(
  model: Model,
  head: heads.LoadedHead,
  prompts: Prompt | Sequence[Prompt],
  *,
  max_new_tokens: int = 64,
  tree: TreeSpec | None = None,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  stop_tokens: Sequence[int] | None = None,
  chat: bool = False,
) -> Generation:
  """Generates a continuation for each prompt in one batch, drafting with `head`.

  Arguments as for `kvjax.lm.generate`; tree: the draft tree (default TreeSpec(); top_k=1 is
  chain drafting). stats adds mean_accept_len (tokens per verify forward, the bonus token
  included, over every row's rounds), target_forwards (verify forwards after the prefill),
  rounds_per_row, and accept_lens (per row, the tokens each of its rounds produced, in order:
  what mean_accept_len averages)."""
  tree = check_tree(model, head, tree)
  req = request(model, prompts, max_new_tokens, sampling, key, stop, stop_tokens, chat)
  check_context(model, req.rows, max_new_tokens)
  front, prefill_s, compile_p = _prefill(model, head, req, max_new_tokens, tree)
  res, decode_s, compile_d = steps.timed(
    model,
    decoding.loop,
    head.state,
    front,
    req.key,
    jnp.int32(max_new_tokens),
    jnp.asarray(req.stop_ids, jnp.int32),
    head_graphdef=head.graphdef,
    sampling=req.sampling,
    spec=tree,
    max_steps=steps.bucket(max_new_tokens),
  )
  out, counts = np.asarray(res.tokens), np.asarray(res.counts)
  check_finite(model, res.bad, "speculative generate")
  texts, toks, finish = outputs(model, out, counts, req.stop, req.stop_ids)
  stats = decode_stats(
    prefill_s=prefill_s,
    decode_s=decode_s,
    compile_s=compile_p + compile_d,
    prompt_tokens=sum(map(len, req.rows)),
    new_tokens=int(counts.sum()),
    **_accept_stats(res),
  )
  return Generation(texts, toks, req.rows, finish, stats)


def check_tree(model: Model, head: heads.LoadedHead, tree: TreeSpec | None) -> TreeSpec:
  """The draft tree to use (default TreeSpec()), after checking the head and the tree fit
  the model."""
  tree = tree or TreeSpec()
  if not isinstance(tree, TreeSpec):
    raise TypeError(f"tree must be a kvjax.speculative.TreeSpec; got {type(tree).__name__}")
  if not isinstance(head, heads.LoadedHead):
    raise TypeError(
      f"head must be a loaded head (kvjax.speculative.load_head); got {type(head).__name__}"
    )
  heads.check(head.hc, model.cfg)
  if tree.top_k > model.cfg.vocab_size:
    raise ValueError(f"tree top_k={tree.top_k} exceeds the vocabulary ({model.cfg.vocab_size})")
  return tree


def _prefill(
  model: Model, head: heads.LoadedHead, req: Request, max_new_tokens: int, tree: TreeSpec
) -> tuple[decoding.Frontier, float, float]:
  """Prefills the target's and the head's new caches, sized for max_new_tokens and the tree
  -> (the first `decoding.Frontier`, seconds, compile seconds)."""
  rows = req.rows
  P, S, S_head = sizes(max(map(len, rows)), max_new_tokens, tree)
  cache = new_cache(model, len(rows), S)
  hcache = heads.new_cache(head.hc, len(rows), S_head, model.dtype)
  tokens, lengths = jnp.asarray(pad(rows, P)), jnp.asarray([len(r) for r in rows], jnp.int32)
  front, seconds, compile_s = steps.timed(
    model,
    decoding.prefill,
    head.state,
    cache,
    hcache,
    tokens,
    lengths,
    req.key,
    head_graphdef=head.graphdef,
    sampling=req.sampling,
  )
  return front, seconds, compile_s


def _accept_stats(res: decoding.Generated) -> dict:
  """speculative.generate's own stats: mean_accept_len, target_forwards, rounds_per_row,
  accept_lens."""
  rounds, accepted = np.asarray(res.rounds), np.asarray(res.accepted)
  return dict(
    mean_accept_len=float(accepted.sum() / max(rounds.sum(), 1)),
    target_forwards=int(res.n_rounds),
    rounds_per_row=rounds.tolist(),
    accept_lens=[a[:r].tolist() for a, r in zip(accepted, rounds)],
  )


def auto_tree(
  model: Model,
  head: heads.LoadedHead,
  prompts: Prompt | Sequence[Prompt],
  *,
  top_k: int = 8,
  depth: int = 5,
  candidates: Sequence[int] = (8, 16, 24, 32, 48, 64),
  max_new_tokens: int = 32,
  log=None,
) -> tuple[TreeSpec, list[dict]]:
  """EAGLE's auto mode: picks total_tokens by timing speculative decoding of `prompts` on this
  machine at each candidate size (compile and one warm-up run excluded, greedy). Sizes the
  (top_k, depth) tree cannot hold are skipped. Returns (the fastest TreeSpec, per-candidate
  dicts of total_tokens, decode_tokens_per_s, mean_accept_len). log: print-like callback."""
  limit = 1 + top_k + (depth - 1) * top_k**2
  sizes_ = sorted({int(n) for n in candidates if 2 <= n <= limit})
  if not sizes_:
    raise ValueError(
      f"no candidate tree size in {list(candidates)} fits top_k={top_k}, depth={depth} (2..{limit})"
    )
  table = []
  for n in sizes_:
    spec = TreeSpec(top_k=top_k, depth=depth, total_tokens=n)
    generate(model, head, prompts, max_new_tokens=max_new_tokens, tree=spec)
    s = generate(model, head, prompts, max_new_tokens=max_new_tokens, tree=spec).stats
    table.append(
      dict(
        total_tokens=n,
        decode_tokens_per_s=s["decode_tokens_per_s"],
        mean_accept_len=s["mean_accept_len"],
      )
    )
    if log:
      log(
        f"tree tokens {n:3d}: {s['decode_tokens_per_s']:.1f} tok/s, "
        f"{s['mean_accept_len']:.2f} tokens per forward"
      )
  best = max(table, key=lambda r: r["decode_tokens_per_s"])
  return TreeSpec(top_k=top_k, depth=depth, total_tokens=best["total_tokens"]), table
