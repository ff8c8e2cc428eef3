"""Skeleton-of-Thought prompts: the templates and how they become token ids.

Each prompt is a user message plus the start of the assistant's reply (the prefill): "1." for
the skeleton, so the model goes straight into a numbered list, and "{i}. {point}" for point i's
expansion, so it continues that point only. A model with a chat template (tokenizer_config.json)
gets the message through it with the prefill appended after the generation prompt; a model
without one gets `Prompts.plain`. Every field can be overridden, also from a JSON file.

The expansion template puts the question, the skeleton and the instruction before the point's
number, so the P expansion prompts share all but their last few tokens, and `kvjax.lm.sot.expansion`
prefills the shared part once.
"""

from __future__ import annotations

import dataclasses
import json
import string

from kvjax.lm import engine
from kvjax.lm.model import Model

SKELETON = (
  "You are an organizer. Do not answer the question below; write only the skeleton of an "
  "answer: a numbered list of at most {max_points} short points (3-5 words each), one per "
  "line, with nothing else.\n\nQuestion: {question}"
)
EXPAND = (
  "You are writing one part of an answer.\n\nQuestion: {question}\n\nThe answer's skeleton:\n"
  "{skeleton}\n\nExpand one point of the skeleton in one or two short sentences, and write "
  "no other point. The point to expand is point {i}."
)
ANSWER = "{question}"

# the placeholders each template may use, and those it must
_FIELDS = {
  "skeleton": ({"question", "max_points"}, {"question"}),
  "skeleton_prefill": (set(), set()),
  "expand": ({"question", "skeleton", "i", "point"}, {"question"}),
  "expand_prefill": ({"i", "point"}, set()),
  "answer": ({"question"}, {"question"}),
  "plain": ({"user", "prefill"}, {"user", "prefill"}),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Prompts:
  """skeleton: the user message asking for a skeleton ({question}, {max_points}).
  expand: the user message for one point ({question}, {skeleton} as "1. ...\\n2. ...", {i},
    {point}); expand_prefill starts the reply ({i}, {point}); it or expand must name {i} or
    {point} so the rows differ.
  answer: the normal, one-pass question ({question}) when a router sends a question away.
  plain: the whole prompt for a model without a chat template ({user}, {prefill}).
  chat: True/False forces the chat template on or off; None uses it when the model has one."""

  skeleton: str = SKELETON
  skeleton_prefill: str = "1."
  expand: str = EXPAND
  expand_prefill: str = "{i}. {point}"
  answer: str = ANSWER
  plain: str = "{user}\n\n{prefill}"
  chat: bool | None = None

  def __post_init__(self):
    for name, (allowed, required) in _FIELDS.items():
      text = getattr(self, name)
      if not isinstance(text, str):
        raise TypeError(f"Prompts.{name} must be a str; got {type(text).__name__}")
      try:
        used = _used(text)
      except ValueError as err:
        raise ValueError(f"Prompts.{name} is not a valid template ({err}): {text!r}") from None
      if used - allowed or required - used:
        raise ValueError(
          f"Prompts.{name} may use {_names(allowed)} and must use "
          f"{_names(required)}; it uses {_names(used)}"
        )
    if not {"i", "point"} & _used(self.expand + self.expand_prefill):
      raise ValueError(
        "Prompts.expand or Prompts.expand_prefill must name {i} or {point}: "
        "otherwise every point gets the same prompt"
      )
    if not self.plain.endswith("{prefill}"):
      raise ValueError("Prompts.plain must end with {prefill}: the model continues from there")
    if self.chat not in (True, False, None):
      raise TypeError(f"Prompts.chat must be True, False or None; got {self.chat!r}")

  @classmethod
  def load(cls, path: str) -> Prompts:
    """Prompts from a JSON object with any of the fields (the rest keep their defaults)."""
    try:
      with open(path) as f:
        data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
      raise ValueError(f"{path}: not a readable JSON file of prompts ({err})") from None
    fields = {f.name for f in dataclasses.fields(cls)}
    if not isinstance(data, dict) or set(data) - fields:
      extra = sorted(set(data) - fields) if isinstance(data, dict) else type(data).__name__
      raise ValueError(
        f"{path}: expected a JSON object with keys among {sorted(fields)}; got {extra}"
      )
    return cls(**data)

  def uses_chat(self, model: Model) -> bool:
    has = model.tokenizer is not None and model.tokenizer.chat_template is not None
    if self.chat and not has:
      raise ValueError(
        "Prompts.chat=True, but the model has no chat template "
        "(tokenizer_config.json has no chat_template)"
      )
    return has if self.chat is None else self.chat

  def render(self, model: Model, user: str, prefill: str = "") -> list[int]:
    """The token ids of a user message and the start of the reply."""
    engine.require_tokenizer(model, "Skeleton-of-Thought")
    tok = model.tokenizer
    if self.uses_chat(model):
      text = tok.apply_chat_template([{"role": "user", "content": user}]) + prefill
      return tok.encode(text, add_special_tokens=False)
    return tok.encode(self.plain.format(user=user, prefill=prefill))

  def skeleton_ids(self, model: Model, question: str, max_points: int) -> list[int]:
    user = self.skeleton.format(question=question, max_points=max_points)
    return self.render(model, user, self.skeleton_prefill)

  def expand_ids(self, model: Model, question: str, points: list[str]) -> list[list[int]]:
    """One prompt per point; they share every token up to the point's own instruction."""
    skeleton = listing(points)
    return [
      self.render(
        model,
        self.expand.format(question=question, skeleton=skeleton, i=i, point=p),
        self.prefill(i, p),
      )
      for i, p in enumerate(points, 1)
    ]

  def prefill(self, i: int, point: str) -> str:
    return self.expand_prefill.format(i=i, point=point)

  def answer_ids(self, model: Model, question: str) -> list[int]:
    return self.render(model, self.answer.format(question=question))


def listing(points: list[str]) -> str:
  """The skeleton as the expansion prompts show it: "1. a\\n2. b"."""
  return "\n".join(f"{i}. {p}" for i, p in enumerate(points, 1))


def _used(text: str) -> set[str]:
  return {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}


def _names(fields: set[str]) -> str:
  return ", ".join("{" + f + "}" for f in sorted(fields)) or "no placeholders"
