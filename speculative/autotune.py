"""The default draft tree: the fastest measured for this device, model and head, measured once.

A tree that pays on a GPU (EAGLE's 32 or 64 tokens) can cost more than it saves where a verify
forward over T tokens costs several decode steps (a CPU): the bundled head is 0.49x plain
decoding with a 32-token tree and 2.2x with a chain. `default_tree` times plain decoding and
each of `CANDIDATES` on a few prompts (compile and a warm-up run excluded; the median of
`REPEATS` passes) and keeps the fastest once a second set of passes confirms it; when none
beats plain decoding by `MARGIN` (5%: a shape that wins by less may lose on the next run, as
timings on a shared machine drift) in both sets it answers None (decode without speculation),
so the default never slows a user down. The choice is stored in `<cache root>/trees.json`
(`$KVJAX_CACHE_DIR`, else `$XDG_CACHE_HOME/kvjax`, else `~/.cache/kvjax`) under the device,
the model's and the head's params fingerprints, the dtype, the sampling settings (greedy
decoding accepts more draft tokens than sampling: each is timed as it runs) and the batch
size (a chain that pays for one row can lose for four), so it is paid once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.engine import Prompt
from kvjax.lm.generate import generate as plain_generate
from kvjax.lm.gguf_cache import default_root
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.speculative import head as heads
from kvjax.speculative.generate import generate
from kvjax.speculative.tree import TreeSpec

# chains (cheap verify forwards) and trees (more tokens accepted per forward), small to large
CANDIDATES = (
  TreeSpec(top_k=1, depth=3, total_tokens=4),
  TreeSpec(top_k=1, depth=5, total_tokens=6),
  TreeSpec(top_k=1, depth=7, total_tokens=8),
  TreeSpec(top_k=4, depth=4, total_tokens=12),
  TreeSpec(top_k=8, depth=5, total_tokens=16),
  TreeSpec(top_k=8, depth=5, total_tokens=32),
  TreeSpec(top_k=8, depth=6, total_tokens=64),
)
# what the timing runs continue when the caller gives no prompts: plain prose and a request
PROMPTS = (
  "The old lighthouse keeper climbed the stairs one last time and",
  "Explain, step by step, how a bill becomes a law.",
)
FILE = "trees.json"
REPEATS = 3  # timed passes over the prompts per candidate; the median counts
MARGIN = 1.05  # a tree must beat plain decoding by this factor to become the default


def device_key() -> str:
  """The device the timing holds for: platform, kind and count (on a CPU its core count and
  processor)."""
  d = jax.devices()[0]
  key = f"{d.platform}:{d.device_kind}x{len(jax.devices())}"
  if d.platform == "cpu":
    key += f":{os.cpu_count()}cores:{platform.machine()}:{platform.processor() or '-'}"
  return key


def head_fingerprint(head: heads.LoadedHead) -> str:
  """A digest of the head's config and params (the same sampling as `params_fingerprint`)."""
  h = hashlib.sha256(json.dumps(head.hc.to_json(), sort_keys=True).encode())
  for leaf in jax.tree.leaves(head.params()):
    flat = np.asarray(leaf).reshape(-1)
    h.update(str(leaf.shape).encode())
    h.update(flat[:: max(1, flat.size // 4096)][:4096].astype(np.float32).tobytes())
  return h.hexdigest()[:32]


def key_of(
  model: Model, head: heads.LoadedHead, sampling: Sampling | None = None, batch: int = 1
) -> str:
  """The cache key: device, both params fingerprints, dtype, the sampling settings (a sampled
  stream accepts fewer draft tokens than a greedy one: its best tree differs) and the batch
  (a batch's plain decode step does more work per weight read: the chain that pays for one
  row can lose for four)."""
  s = sampling or Sampling()
  regime = "greedy" if s.greedy else f"T{s.temperature:g}/k{s.top_k}/p{s.top_p:g}"
  parts = (device_key(), params_fingerprint(model), head_fingerprint(head), str(model.dtype))
  return "|".join((*parts, regime, f"B{int(batch)}"))


def default_tree(
  model: Model,
  head: heads.LoadedHead,
  prompts: Prompt | Sequence[Prompt] | None = None,
  *,
  root: str | None = None,
  remeasure: bool = False,
  log: Callable[[str], None] | None = None,
  **options,
) -> TreeSpec | None:
  """The fastest tree for this device, model and head (None: plain decoding is faster than
  every candidate) decoding with options["sampling"] (default greedy) at options["batch"] rows
  (default 1; each setting and batch is timed and cached apart), from the cache or, the first
  time (or with remeasure), timed on `prompts` (default `PROMPTS`) by `measure` with `options`
  (candidates, max_new_tokens, chat, sampling, batch) and stored. root: the cache directory
  (default the kvjax cache root). log: print-like progress callback."""
  key = key_of(model, head, options.get("sampling"), options.get("batch", 1))
  entry = None if remeasure else _read(root).get(key)
  if entry is None:
    entry = measure(model, head, prompts, log=log, **options)
    _write(root, key, entry)
  elif log:
    log(f"default tree from {os.path.join(root or default_root(), FILE)}: {_name(entry['tree'])}")
  t = entry["tree"]
  return None if t is None else TreeSpec(**t)


def measure(
  model: Model,
  head: heads.LoadedHead,
  prompts: Prompt | Sequence[Prompt] | None = None,
  *,
  candidates: Sequence[TreeSpec] | None = None,
  max_new_tokens: int = 48,
  chat: bool | None = None,
  sampling: Sampling | None = None,
  batch: int = 1,
  log: Callable[[str], None] | None = None,
) -> dict:
  """Times plain decoding and each candidate tree (decode tok/s of a pass: runs of `batch`
  rows that take every prompt once, the last run's rows filled from the first prompts; after
  a warm-up run; greedy, or `sampling` with fixed keys). Each shape's passes alternate with
  plain decoding's, REPEATS of each, and its speed relative to plain is the median of the
  pairs' ratios (drift within the measurement hits both sides of a pair alike). The fastest
  shape is timed against plain decoding again (REPEATS more pairs) and kept only if both
  medians reach MARGIN: a load spike during one shape's passes cannot make it the default
  -> {tree: the fastest's fields, or None for plain, table: per-row dicts (tokens_per_s:
  median pass; vs_plain; confirmed_vs_plain on the winner), measured: when}. chat: wrap
  the prompts with the chat template (default: only `PROMPTS`, when the model has one)."""
  heads.check(head.hc, model.cfg)
  if chat is None:
    tok = model.tokenizer
    chat = prompts is None and tok is not None and tok.chat_template is not None
  rows = list(PROMPTS if prompts is None else [prompts] if isinstance(prompts, str) else prompts)
  kw = dict(max_new_tokens=max_new_tokens, chat=chat, stop_tokens=())
  if sampling is not None and not sampling.greedy:
    kw.update(sampling=sampling, key=jax.random.key(0))

  if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
    raise ValueError(f"batch must be an int >= 1; got {batch!r}")
  n_groups = -(-len(rows) // batch)  # every prompt once, the last group filled cyclically
  groups = [[rows[(i * batch + j) % len(rows)] for j in range(batch)] for i in range(n_groups)]

  def one_pass(run) -> float:
    decode_s = tokens = 0.0
    for p in groups:
      s = run(p).stats
      decode_s, tokens = decode_s + s["decode_s"], tokens + s["new_tokens"]
    return tokens / decode_s

  plain = lambda p: plain_generate(model, p, **kw)
  plain(groups[0])  # compile and warm up
  shapes = [
    c for c in (CANDIDATES if candidates is None else candidates) if c.top_k <= model.cfg.vocab_size
  ]
  if log:
    log(f"timing the default tree: plain decoding and {len(shapes)} shapes, in alternating passes")
  table, plain_passes = [], []
  for spec in shapes:
    run = lambda p, spec=spec: generate(model, head, p, tree=spec, **kw)
    run(groups[0])  # compile and warm up
    speeds, ratios = [], []
    for _ in range(REPEATS):  # plain and the shape alternate, so drift hits both alike
      b, v = one_pass(plain), one_pass(run)
      plain_passes.append(b)
      speeds.append(v)
      ratios.append(v / b)
    table.append(dict(tree=_fields(spec), tokens_per_s=_median(speeds), vs_plain=_median(ratios)))
    if log:
      row = table[-1]
      log(f"  {_name(row['tree'])}: {row['tokens_per_s']:.1f} tok/s ({row['vs_plain']:.2f}x plain)")
  plain_passes = plain_passes or [one_pass(plain) for _ in range(REPEATS)]
  table.insert(0, dict(tree=None, tokens_per_s=_median(plain_passes), vs_plain=1.0))
  best = max(table, key=lambda r: r["vs_plain"])
  if best["vs_plain"] >= MARGIN:  # confirm the winner: a load spike can fake one set of passes
    spec = TreeSpec(**best["tree"])
    run = lambda p: generate(model, head, p, tree=spec, **kw)
    again = [one_pass(run) / one_pass(plain) for _ in range(REPEATS)]
    best["confirmed_vs_plain"] = _median(again)
    if log:
      log(f"  confirming {_name(best['tree'])}: {best['confirmed_vs_plain']:.2f}x plain")
  if min(best["vs_plain"], best.get("confirmed_vs_plain", MARGIN)) < MARGIN:
    best = table[0]  # within timing noise of plain decoding, or not confirmed: keep plain
  if log:
    log(f"default tree: {_name(best['tree'])} ({best['vs_plain']:.2f}x plain decoding)")
  return dict(tree=best["tree"], table=table, measured=time.strftime("%Y-%m-%d %H:%M:%S"))


def _median(xs: Sequence[float]) -> float:
  return float(np.median(xs))


def _fields(spec: TreeSpec) -> dict:
  return dict(top_k=spec.top_k, depth=spec.depth, total_tokens=spec.total_tokens)


def _name(t: dict | None) -> str:
  if t is None:
    return "none (plain decoding)"
  return f"top_k {t['top_k']}, depth {t['depth']}, {t['total_tokens']} tokens"


def _read(root: str | None) -> dict:
  path = os.path.join(root or default_root(), FILE)
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, ValueError):
    return {}  # absent, unreadable or corrupt: measured (again) and rewritten
  return data if isinstance(data, dict) else {}


def _write(root: str | None, key: str, entry: dict) -> None:
  """Adds the entry to the cache file (under a lock; written atomically). A cache that cannot
  be written is skipped: the measurement is repeated next time."""
  root = root or default_root()
  with contextlib.suppress(OSError):
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, FILE + ".lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      data = _read(root)
      data[key] = entry
      tmp = os.path.join(root, f"{FILE}.{os.getpid()}.tmp")
      with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
      os.replace(tmp, os.path.join(root, FILE))
