"""Skeleton-of-Thought: the model writes a skeleton of points, then expands every point in one
batched decode whose rows share the question + skeleton prefix (`kvjax.cache.prefix`).

pipeline.py: `run` (route, skeleton, expansion, the joined `Answer`), `normal_latency`.
expansion.py: `expand` / `expand_stream`, batched decoding over a shared prefix cache.
points.py: `parse_points`, the skeleton's numbered or bulleted points.
prompts.py: `Prompts`, the skeleton and expansion templates.
router.py: `route`, whether a question suits SoT (rules or the model's own verdict).

    from kvjax.lm import sot
    answer = sot.run(model, "What makes a good play?", max_points=5)
"""

from kvjax.lm.sot.expansion import common_prefix, expand, expand_stream
from kvjax.lm.sot.pipeline import Answer, normal_latency, run
from kvjax.lm.sot.points import SkeletonError, parse_points
from kvjax.lm.sot.prompts import Prompts
from kvjax.lm.sot.router import ROUTERS, Route, route

__all__ = [
  "ROUTERS",
  "Answer",
  "Prompts",
  "Route",
  "SkeletonError",
  "common_prefix",
  "expand",
  "expand_stream",
  "normal_latency",
  "parse_points",
  "route",
  "run",
]
