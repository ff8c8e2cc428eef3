"""Skeleton-of-Thought helpers: the skeleton point parser and the router. Pure Python."""

import pytest

from kvjax.lm.sot.points import SkeletonError, parse_points
from kvjax.lm.sot.router import ROUTERS, Route, parse_verdict, route, router_question, rules_route

TEN = "\n".join(f"{i}. point {i}" for i in range(1, 11))


@pytest.mark.parametrize(
  "text, points",
  [
    ("1. Buy tools\n2. Plan route\n3. Pack food", ["Buy tools", "Plan route", "Pack food"]),
    ("1) Buy tools\n2) Plan route", ["Buy tools", "Plan route"]),
    ("(1) Buy tools\n(2) Plan route", ["Buy tools", "Plan route"]),
    ("1: Buy tools\n2 - Plan route\n  3. Pack food", ["Buy tools", "Plan route", "Pack food"]),
    (
      "- Buy tools\n* Plan route\n• Pack food\n+ Rest\n– Leave",
      ["Buy tools", "Plan route", "Pack food", "Rest", "Leave"],
    ),
    ("- Travel\n  - flights\n- Stay", ["Travel flights", "Stay"]),  # deeper bullet continues
    (
      "**1.** Buy tools\n**2. Plan route**\n3. **Pack food**: snacks",
      ["Buy tools", "Plan route", "Pack food: snacks"],
    ),
    (
      "**1. Budget:** set a limit\n2. __Track__ spending",
      ["Budget: set a limit", "Track spending"],
    ),
    ("### 1. Sleep\n### 2. Diet", ["Sleep", "Diet"]),
    ("1. Choose a\n   good topic\n2. Outline", ["Choose a good topic", "Outline"]),
    (
      "1. Preparation:\n   - buy tools\n   * pack food\n2. Travel",
      ["Preparation: buy tools pack food", "Travel"],
    ),
    ("1. Sleep\n2. Diet\n2. Diet again\n   more\n3. Exercise", ["Sleep", "Diet", "Exercise"]),
    ("1. Sleep\n2. Diet\n4. Exercise", ["Sleep", "Diet", "Exercise"]),
    ("Sure, here is the skeleton:\n\n1. Sleep\n2. Diet", ["Sleep", "Diet"]),
    ("1. Sleep\n2. Diet\n\nLet me know if you need more!", ["Sleep", "Diet"]),
    ("1. Sleep\n\n2. Diet\n\n- note\n3. Exercise", ["Sleep", "Diet note", "Exercise"]),
    ("1. Buy tools 2. Plan route 3. Pack food", ["Buy tools", "Plan route", "Pack food"]),
    ("1. a\n5. Use version 2. Then reinstall\n6. b", ["a", "Use version 2. Then reinstall", "b"]),
    ("1. Population\n1.5 million people live there", ["Population 1.5 million people live there"]),
    ("1. Sleep\r\n2. Diet\r\n", ["Sleep", "Diet"]),
    ("1.\n1. Sleep\n2. Diet", ["Sleep", "Diet"]),  # the prefill "1." then the model's own "1."
    ("1. 1. Sleep\n2. Diet", ["Sleep", "Diet"]),
    ("1. Sleep\n2.\n2. Diet", ["Sleep", "Diet"]),  # an empty point filled by a later 2.
    ("- intro\n1. Sleep\n2. Diet", ["Sleep", "Diet"]),  # numbers exist: bullets are not points
    (TEN, [f"point {i}" for i in range(1, 11)]),  # exactly max_points
  ],
)
def test_parse_points(text, points):
  assert parse_points(text) == points


@pytest.mark.parametrize("text", ["blah", "", "  \n\n", "1.\n2.", "Here you go:\n\n"])
def test_no_points(text):
  with pytest.raises(SkeletonError, match="no points: expected numbered lines"):
    parse_points(text)


@pytest.mark.parametrize(
  "text, which",
  [
    ("1. Sleep\n2.\n3. Diet", "point 2"),  # not dropped with Diet renumbered 2
    ("1. Sleep\n2. Diet\n3.", "point 3"),  # a trailing number (a skeleton cut short)
    ("1. Sleep\n4. **\n5. Diet", "point 4"),  # only emphasis markers: no text
    ("1. Sleep\n2. :\n3. Diet", "point 2"),
    ("- Sleep\n- \n- Diet", "bullet 2"),
  ],
)
def test_a_point_with_no_text_is_an_error(text, which):
  with pytest.raises(SkeletonError, match=rf"^skeleton {which} has no text: write the point or"):
    parse_points(text)


def test_no_points_quotes_at_most_80_chars():
  with pytest.raises(SkeletonError) as err:
    parse_points("x" * 500)
  assert "x" * 78 not in str(err.value) and "x" * 50 in str(err.value)


def test_too_many_points():
  with pytest.raises(SkeletonError, match=r"has 12 points, more than max_points=10"):
    parse_points("\n".join(f"{i}. point {i}" for i in range(1, 13)))
  with pytest.raises(SkeletonError, match=r"has 3 points, more than max_points=2"):
    parse_points("- a\n- b\n- c", max_points=2)
  assert parse_points(TEN, max_points=10) == [f"point {i}" for i in range(1, 11)]


@pytest.mark.parametrize("max_points", [0, -1, 2.0, True, "3"])
def test_bad_max_points(max_points):
  with pytest.raises(ValueError, match="max_points must be an int >= 1"):
    parse_points("1. a", max_points=max_points)


@pytest.mark.parametrize("text", [None, b"1. a", ["1. a"]])
def test_not_a_str(text):
  with pytest.raises(TypeError, match="must be a str"):
    parse_points(text)


@pytest.mark.parametrize(
  "question, suitable, rule",
  [
    ("What is 37 * 49?", False, "math"),
    ("Solve x^2 - 4 = 0 for x.", False, "math"),
    ("Estimate how many piano tuners work in Chicago.", False, "fermi"),
    ("How many golf balls are there in the world?", False, "fermi"),
    ("Write a Python function that reverses a list.", False, "code"),
    ("Help me debug this loop.", False, "code"),
    ("Write a poem about autumn.", False, "creative"),
    ("Write me a short story about a dragon.", False, "creative"),
    ("What is the capital of France?", False, "fact"),
    ("Who wrote Hamlet?", False, "fact"),
    ("Give me some tips for a job interview.", True, "list-like"),
    ("What are the best ways to save money?", True, "list-like"),
    ("What are the advantages of remote work?", True, "list-like"),
    ("How can I improve my time management?", True, "list-like"),
    ("What are the steps to bake bread?", True, "list-like"),
    ("Compare cats and dogs as pets.", True, "comparison"),
    ("Why is the sky blue?", True, "no rule matched"),
    ("List ways to solve this equation.", False, "math"),  # unsuitable cues win
  ],
)
def test_rules_route(question, suitable, rule):
  r = rules_route(question)
  assert (r.suitable, r.router) == (suitable, "rules") and r.reason.startswith(rule)
  assert rules_route(question.upper()).suitable == suitable


def test_rules_reason_names_the_match():
  assert rules_route("Please SOLVE this").reason == "math: 'solve'"
  assert rules_route("Why is the sky blue?").reason == "no rule matched; default"
  assert rules_route("How can I improve my sleep?").suitable  # "improve" is not "prove"


@pytest.mark.parametrize(
  "answer, verdict",
  [
    ("Yes.", True),
    ("yes, because the points are independent", True),
    ("No", False),
    ("NO!", False),
    ("Answer: yes", True),
    ("**Yes**", True),
    ("suitable", True),
    ("unsuitable", False),
    ("not suitable", False),
    ("It is not suitable.", False),
    ("true", True),
    ("False.", False),
    ("I don't know", None),
    ("maybe", None),
    ("", None),
    ("I know the answer: no", False),
    ("Nothing to add. Yes", True),
  ],
)
def test_parse_verdict(answer, verdict):
  assert parse_verdict(answer) is verdict


def test_router_question():
  q = "What are some tips for learning French?"
  text = router_question(q)
  assert q in text and "yes" in text and "no" in text


def test_route():
  q = "Why is the sky blue?"
  asked = []
  yes = route(q, "prompt", ask=lambda text: asked.append(text) or "Yes.")
  assert yes == Route(True, "prompt", "the model answered 'Yes.'") and asked == [router_question(q)]
  assert not route(q, "prompt", ask=lambda text: "No, the answer is one fact.").suitable
  assert route(q, "always") == Route(True, "always", "router 'always'")
  assert not route("Give me tips", "never").suitable
  assert route(q) == rules_route(q)
  fallback = route("Write a poem about rain.", "prompt", ask=lambda text: "maybe")
  assert (fallback.suitable, fallback.router) == (False, "prompt")
  assert fallback.reason == (
    "the model's answer 'maybe' is neither yes nor no; rules: creative: 'write a poem'"
  )


def test_route_errors():
  with pytest.raises(ValueError, match="needs ask="):
    route("Why is the sky blue?", "prompt")
  with pytest.raises(ValueError, match="unknown router 'llm'.*" + ", ".join(ROUTERS)):
    route("Why is the sky blue?", "llm")
  for q in ("", "   \n"):
    with pytest.raises(ValueError, match="the question is empty"):
      route(q, "always")
