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
  a point (and the skeleton). share: prefill question + skeleton once (False: every row repeats it, as
  the reference implementation batches). on_point(i, text): called for points 1..P in order as
  soon as each and every point before it is written. With on_point or stop strings, decoding
  runs in `chunk`-step calls, between which finished rows are checked (a row whose text reached
  a stop string stops there); else in one call."""
  if not isinstance(question, str) or not question.strip():
    raise ValueError(f"the question is empty: pass the text to answer; got {question!r}")
  check_request(model, 1, sampling, key)  # a bad key or sampling fails before any work
  prompts = prompts or Prompts()
  kw = dict(sampling=sampling, key=key, stop=stop)
  t_route, compile_s = 0.0, 0.0
  if skeleton is None:

    def ask(text: str) -> str:
      nonlocal compile_s
      g = generate(model, [prompts.render(model, text)], max_new_tokens=8)
      compile_s += g.stats["compile_s"]
      return g.texts[0]

    t0 = time.perf_counter()
    decision = route(question, router, ask=ask)
    t_route = time.perf_counter() - t0 - compile_s
  else:
    points = parse_points(skeleton, max_points=max_points)  # errors before any work
    decision = Route(True, "supplied", "a skeleton was supplied")
  if not decision.suitable:
    g = generate(model, [prompts.answer_ids(model, question)], max_new_tokens=answer_tokens, **kw)
    s = g.stats
    return Answer(
      question,
      decision,
      None,
      [],
      [],
      g.texts[0],
      dict(
        mode="normal",
        latency_s=t_route + s["prefill_s"] + s["decode_s"],
        route_s=t_route,
        skeleton_s=0.0,
        expand_s=0.0,
        compile_s=compile_s + s["compile_s"],
        skeleton_tokens=0,
        answer_tokens=s["new_tokens"],
        generated_tokens=s["new_tokens"],
        prefix_tokens_shared=0,
        cache_bytes=s["cache_bytes"],
      ),
    )

  skeleton_s, skeleton_n = 0.0, 0
  if skeleton is None:
    g = generate(
      model,
      [prompts.skeleton_ids(model, question, max_points)],
      max_new_tokens=skeleton_tokens,
      **kw,
    )
    skeleton = prompts.skeleton_prefill + g.texts[0]
    skeleton_s = g.stats["prefill_s"] + g.stats["decode_s"]
    skeleton_n, compile_s = g.stats["new_tokens"], compile_s + g.stats["compile_s"]
    points = parse_points(skeleton, max_points=max_points)
  if not isinstance(point_tokens, int):
    point_tokens = list(point_tokens)
    if len(point_tokens) != len(points):
      raise ValueError(f"point_tokens gives {len(point_tokens)} budgets for {len(points)} points")

  stats: dict = {}
  expansions: list[str] = [""] * len(points)
  if key is not None:  # the expansions sample apart from the skeleton
    kw["key"] = jax.random.fold_in(key, 1)
  for row in expand_stream(
    model,
    prompts.expand_ids(model, question, points),
    max_new_tokens=point_tokens,
    share=share,
    chunk=chunk if on_point or stop else None,
    stats=stats,
    **kw,
  ):
    expansions[row.index] = row.text
    if on_point is not None:
      on_point(row.index + 1, prompts.prefill(row.index + 1, points[row.index]) + row.text)
  expand_s = stats["prefill_s"] + stats["decode_s"]
  answer = "\n".join(
    prompts.prefill(i, p) + e.rstrip() for i, (p, e) in enumerate(zip(points, expansions), 1)
  )
  return Answer(
    question,
    decision,
    skeleton,
    points,
    expansions,
    answer,
    dict(
      mode="sot",
      latency_s=t_route + skeleton_s + expand_s,
      route_s=t_route,
      skeleton_s=skeleton_s,
      expand_s=expand_s,
      compile_s=compile_s + stats["compile_s"],
      skeleton_tokens=skeleton_n,
      answer_tokens=stats["new_tokens"],
      generated_tokens=skeleton_n + stats["new_tokens"],
      prefix_tokens_shared=stats["prefix_tokens_shared"],
      cache_bytes=stats["cache_bytes"],
    ),
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
