"""Whether a question suits Skeleton-of-Thought: an answer made of independent points.

SoT expands every point of a skeleton in parallel, each seeing only the skeleton, so it fits
answers whose points stand on their own (tips, reasons, comparisons, generic knowledge) and
not answers built step on step (math, Fermi estimates, code), one flowing text (a poem, a
story) or a single short fact. Procedural "steps" count as suitable: the skeleton fixes their
order and each step can be described without the others' text; questions whose steps carry
results forward (math, code) are caught by those rules first.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

ROUTERS = ("prompt", "rules", "always", "never")

_UNSUITABLE = (  # checked first: any match wins over a suitable cue
  (
    "math",
    r"\d+\s*[+*×÷^=]\s*\d+|\d+\s+[-/]\s+\d+|\d+\s*% of\b|\b(?:solve|calculat\w*|compute"
    r"|equations?|integrals?|derivatives?|prove|proof)\b",
  ),
  (
    "fermi",
    r"\bestimate how (?:many|much)\b|\bfermi\b|\bhow many\b[^.?!]*?\b(?:in the world"
    r"|on earth|in a lifetime|are there)\b",
  ),
  (
    "code",
    r"\bwrite (?:me )?(?:an? |the |some )?(?:\w+ )?(?:function|program|script|class"
    r"|method|query|regex)\b|\bcode\b|\bimplement\w*|\bpython\b|\bdebug\w*|\bjavascript\b"
    r"|\bc\+\+|\bsql\b",
  ),
  (
    "creative",
    r"\b(?:write|compose) (?:me )?(?:an? |the |some )?(?:\w+ ){0,2}?(?:poem|story"
    r"|essay|song|letter|haiku|sonnet|limerick|lyrics|speech)s?\b",
  ),
  (
    "fact",
    r"\bwhat is the (?:capital|population) of\b|\bwho (?:wrote|invented|painted"
    r"|discovered|composed|founded)\b|\bwhen (?:did|was|were)\b|\b(?:what|which) year\b",
  ),
)
_SUITABLE = (
  (
    "list-like",
    r"\b(?:tips|ways|ideas|reasons|advantages|disadvantages|benefits|pros and cons"
    r"|strategies|suggestions|examples|factors|steps|list)\b|\bwhat are some\b"
    r"|\bhow (?:can|could|do|should) i improve\b",
  ),
  ("comparison", r"\bcompar\w*|\bdifferences?\b|\bversus\b|\bvs\.?(?=\s)"),
)
_VERDICTS = {
  "yes": True,
  "yeah": True,
  "yep": True,
  "true": True,
  "suitable": True,
  "no": False,
  "nope": False,
  "false": False,
  "unsuitable": False,
}
_NEGATIONS = {"not", "isn't", "cannot", "can't", "won't", "doesn't", "aren't"}


@dataclasses.dataclass(frozen=True)
class Route:
  """A routing decision: `suitable` True answers by skeleton and parallel expansion."""

  suitable: bool
  router: str  # one of ROUTERS
  reason: str  # a short human-readable why


def _checked(question: str) -> str:
  if not isinstance(question, str):
    raise TypeError(f"the question must be a str; got {type(question).__name__}")
  if not question.strip():
    raise ValueError("the question is empty")
  return question


def _quote(text: str, limit: int = 40) -> str:
  text = " ".join(text.split())
  return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def rules_route(question: str) -> Route:
  """Keyword rules, case-insensitive; an unsuitable cue wins over a suitable one, and a question
  with no cue is suitable. The reason names the rule and the text it matched."""
  q = _checked(question).lower()
  for rules, suitable in ((_UNSUITABLE, False), (_SUITABLE, True)):
    for name, pattern in rules:
      if m := re.search(pattern, q):
        return Route(suitable, "rules", f"{name}: {_quote(m.group())}")
  return Route(True, "rules", "no rule matched; default")


def router_question(question: str) -> str:
  """What the prompt router asks the model about `question`."""
  return (
    'Decide how the question below is best answered. Answer "yes" if a good answer is '
    "a handful of separate points, each of which can be explained fully on its own "
    'without reading the explanations of the others. Answer "no" if the answer must be '
    "worked out step by step with each step using earlier results (a calculation, an "
    "estimate, code), must be one continuous piece of writing, or is a single short "
    "fact. Reply with one word only: yes or no.\n\n"
    f"Question: {question}\n\nReply (yes or no):"
  )


def parse_verdict(answer: str) -> bool | None:
  """The model's verdict: its first yes/no-like word ("Yes.", "**No**", "Answer: yes",
  "suitable", "false"), flipped by a negation just before it ("not suitable" is False); None
  when it has none ("I don't know", "maybe")."""
  if not isinstance(answer, str):
    raise TypeError(f"the model's answer must be a str; got {type(answer).__name__}")
  words = re.findall(r"[a-z]+(?:['’][a-z]+)?", answer.lower().replace("’", "'"))
  for i, word in enumerate(words):
    if word in _VERDICTS:
      negated = i > 0 and words[i - 1] in _NEGATIONS
      return _VERDICTS[word] != negated
  return None


def route(
  question: str, router: str = "rules", *, ask: Callable[[str], str] | None = None
) -> Route:
  """Route `question` with `router` (one of ROUTERS). "prompt" puts `router_question(question)`
  to the model through `ask` (text in, the model's answer out) and falls back to the rules,
  saying so in the reason, when the answer is neither yes nor no."""
  if router not in ROUTERS:
    raise ValueError(f"unknown router {router!r}: expected one of {', '.join(ROUTERS)}")
  _checked(question)
  if router in ("always", "never"):
    return Route(router == "always", router, f"router {router!r}")
  if router == "rules":
    return rules_route(question)
  if ask is None:
    raise ValueError(
      "the prompt router needs ask=, a callable that puts a question to the "
      "model and returns its answer"
    )
  answer = ask(router_question(question))
  verdict = parse_verdict(answer)
  if verdict is not None:
    return Route(verdict, "prompt", f"the model answered {_quote(answer)}")
  rules = rules_route(question)
  return Route(
    rules.suitable,
    "prompt",
    f"the model's answer {_quote(answer)} is neither yes nor no; rules: {rules.reason}",
  )
