"""Skeleton-of-Thought: a skeleton of points, then every point expanded in one batched decode.

    from kvjax.lm import sot
    ans = sot.run(model, "How can I sleep better?")                  # the model writes it all
    ans = sot.run(model, q, skeleton="1. Dark room\\n2. No coffee")    # a supplied skeleton
    print(ans.answer, ans.stats["latency_s"])

Stages: the router (rules, the model's own verdict, always, never) decides whether the question
suits independent points; the model writes a skeleton after the prefill "1." (or the caller
supplies one), parsed by `kvjax.lm.sot.points.parse_points`; the P point prompts share the
question and the skeleton, which `kvjax.lm.sot.expansion` prefills once, and all points decode
together, each stopping on its own. A question the router sends away is answered in one normal pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax

from kvjax.lm.engine import check_request
from kvjax.lm.generate import generate
from kvjax.lm.model import Model
from kvjax.lm.sampling import Sampling
from kvjax.lm.sot.expansion import expand_stream
from kvjax.lm.sot.points import parse_points
from kvjax.lm.sot.prompts import Prompts
from kvjax.lm.sot.router import Route, route


@dataclasses.dataclass
class Answer:
  """skeleton: the skeleton text (the model's, its prefill included, or the supplied one; None
  when routed away). points: its parsed points. expansions: each point's text after its
  prefill "{i}. {point}". answer: the points joined in order (or the normal answer).
  stats: mode ("sot" or "normal"), latency_s (route + skeleton + expansion, compilation
  excluded), route_s, skeleton_s, expand_s, compile_s, skeleton_tokens and answer_tokens
  (generated), generated_tokens (both), prefix_tokens_shared, cache_bytes (the expansion's
  decode cache, or the normal answer's)."""

  question: str
  route: Route
  skeleton: str | None
  points: list[str]
  expansions: list[str]
  answer: str
  stats: dict


def run(
  model: Model,
  question: str,
  *,
  skeleton: str | None = None,
  max_points: int = 10,
  point_tokens: int | Sequence[int] = 64,
  skeleton_tokens: int = 128,
  answer_tokens: int = 256,
  router: str = "always",
  prompts: Prompts | None = None,
  sampling: Sampling | None = None,
  key: jax.Array | None = None,
  stop: Sequence[str] = (),
  share: bool = True,
  on_point: Callable[[int, str], None] | None = None,
  chunk: int = 16,
) -> Answer:
  """Answers `question` by Skeleton-of-Thought (or normally, when `router` says so).

  skeleton: the points to expand (any format `parse_points` reads; the router is then not
  asked); else the model writes one in at most skeleton_tokens. max_points: more points is an
  error, never a cut. point_tokens: each point's budget (or one per point). answer_tokens: the
  normal answer's budget. router: one of `kvjax.lm.sot.router.ROUTERS`. stop: strings that end
  a point (and the skeleton). share: prefill question + skeleton once (False: every row repeats
  it, as the reference implementation batches). on_point(i, text): called for points 1..P in
  order as soon as each and every point before it is written. With on_point or stop strings,
  decoding runs in `chunk`-step calls, between which finished rows are checked (a row whose text
  reached a stop string stops there); else in one call."""
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"the question is empty: pass the text to answer; got {question!r}")
  check_request(model, 1, sampling, key)  # a bad key or sampling fails before any work
  prompts = prompts or Prompts()
  kw = dict(sampling=sampling, key=key, stop=stop)
  if skeleton is None:
    decision, route_s, compile_s = _route(model, question, router, prompts)
  else:
    points = parse_points(skeleton, max_points=max_points)  # errors before any work
    decision, route_s, compile_s = Route(True, "supplied", "a skeleton was supplied"), 0.0, 0.0
  if not decision.suitable:
    return _normal(model, question, decision, prompts, answer_tokens, route_s, compile_s, kw)

  skeleton_s, skeleton_n = 0.0, 0
  if skeleton is None:
    skeleton, skeleton_s, skeleton_n, c = _skeleton(
      model, question, prompts, max_points, skeleton_tokens, kw
    )
    compile_s += c
    points = parse_points(skeleton, max_points=max_points)
  if key is not None:  # the expansions sample apart from the skeleton
    kw["key"] = jax.random.fold_in(key, 1)
  expansions, s = _expand(
    model,
    question,
    points,
    prompts,
    point_tokens=point_tokens,
    share=share,
    on_point=on_point,
    chunk=chunk if on_point or stop else None,
    **kw,
  )
  answer = "\n".join(
    prompts.prefill(i, p) + e.rstrip() for i, (p, e) in enumerate(zip(points, expansions), 1)
  )
  stats = _stats(
    "sot",
    route_s=route_s,
    skeleton_s=skeleton_s,
    expand_s=s["prefill_s"] + s["decode_s"],
    compile_s=compile_s + s["compile_s"],
    skeleton_tokens=skeleton_n,
    answer_tokens=s["new_tokens"],
    prefix_tokens_shared=s["prefix_tokens_shared"],
    cache_bytes=s["cache_bytes"],
  )
  return Answer(question, decision, skeleton, points, expansions, answer, stats)


def _normal(
  model: Model,
  question: str,
  decision: Route,
  prompts: Prompts,
  answer_tokens: int,
  route_s: float,
  compile_s: float,
  kw: dict,
) -> Answer:
  """The question answered in one normal pass (the router sent it away from SoT)."""
  g = generate(model, [prompts.answer_ids(model, question)], max_new_tokens=answer_tokens, **kw)
  s = g.stats
  stats = _stats(
    "normal",
    route_s=route_s,
    answer_s=s["prefill_s"] + s["decode_s"],
    compile_s=compile_s + s["compile_s"],
    answer_tokens=s["new_tokens"],
    cache_bytes=s["cache_bytes"],
  )
  return Answer(question, decision, None, [], [], g.texts[0], stats)


def _skeleton(
  model: Model, question: str, prompts: Prompts, max_points: int, skeleton_tokens: int, kw: dict
) -> tuple[str, float, int, float]:
  """The model's skeleton, its prefill included -> (text, seconds, tokens generated, compile
  seconds)."""
  g = generate(
    model,
    [prompts.skeleton_ids(model, question, max_points)],
    max_new_tokens=skeleton_tokens,
    **kw,
  )
  s = g.stats
  return (
    prompts.skeleton_prefill + g.texts[0],
    s["prefill_s"] + s["decode_s"],
    s["new_tokens"],
    s["compile_s"],
  )


def _route(
  model: Model, question: str, router: str, prompts: Prompts
) -> tuple[Route, float, float]:
  """Asks `router` whether the question suits SoT -> (its Route, seconds, compile seconds of
  the model's verdict, when the router asks the model)."""
  compile_s = 0.0

  def ask(text: str) -> str:
    nonlocal compile_s
    g = generate(model, [prompts.render(model, text)], max_new_tokens=8)
    compile_s += g.stats["compile_s"]
    return g.texts[0]

  t0 = time.perf_counter()
  decision = route(question, router, ask=ask)
  return decision, time.perf_counter() - t0 - compile_s, compile_s


def _expand(
  model: Model,
  question: str,
  points: list[str],
  prompts: Prompts,
  *,
  point_tokens,
  on_point: Callable[[int, str], None] | None,
  **kw,
) -> tuple[list[str], dict]:
  """Expands every point in one batch (`expand_stream`; kw: its other arguments), each in at
  most point_tokens tokens (or its own of a sequence, one per point), calling
  on_point(i, text) as each point and every one before it is done -> (each point's text
  after its prefill, `expand`'s stats)."""
  if not isinstance(point_tokens, int):
    point_tokens = list(point_tokens)
    if len(point_tokens) != len(points):
      raise ValueError(f"point_tokens gives {len(point_tokens)} budgets for {len(points)} points")
  stats: dict = {}
  expansions: list[str] = [""] * len(points)
  for row in expand_stream(
    model,
    prompts.expand_ids(model, question, points),
    max_new_tokens=point_tokens,
    stats=stats,
    **kw,
  ):
    expansions[row.index] = row.text
    if on_point is not None:
      on_point(row.index + 1, prompts.prefill(row.index + 1, points[row.index]) + row.text)
  return expansions, stats


def _stats(
  mode: str,
  *,
  route_s: float,
  skeleton_s: float = 0.0,
  expand_s: float = 0.0,
  answer_s: float = 0.0,
  compile_s: float,
  skeleton_tokens: int = 0,
  answer_tokens: int,
  prefix_tokens_shared: int = 0,
  cache_bytes: int,
) -> dict:
  """`Answer.stats`. answer_s: the normal answer's seconds (mode "normal"); latency_s sums
  the stages' seconds, generated_tokens the skeleton's and the answer's tokens."""
  return dict(
    mode=mode,
    latency_s=route_s + skeleton_s + expand_s + answer_s,
    route_s=route_s,
    skeleton_s=skeleton_s,
    expand_s=expand_s,
    compile_s=compile_s,
    skeleton_tokens=skeleton_tokens,
    answer_tokens=answer_tokens,
    generated_tokens=skeleton_tokens + answer_tokens,
    prefix_tokens_shared=prefix_tokens_shared,
    cache_bytes=cache_bytes,
  )


def normal_latency(
  model: Model, question: str, n_tokens: int, *, prompts: Prompts | None = None
) -> dict:
  """Seconds to answer `question` normally with exactly n_tokens new tokens (stop tokens
  ignored), as SoT's baseline at equal generated tokens: latency_s (prefill + decode,
  compilation excluded), tokens, compile_s."""
  prompts = prompts or Prompts()
  g = generate(
    model, [prompts.answer_ids(model, question)], max_new_tokens=n_tokens, stop_tokens=[]
  )
  s = g.stats
  return dict(
    latency_s=s["prefill_s"] + s["decode_s"], tokens=s["new_tokens"], compile_s=s["compile_s"]
  )
