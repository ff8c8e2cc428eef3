"""Tokenizer from `tokenizer.json`; special tokens and chat template from
`tokenizer_config.json`."""

from __future__ import annotations

import json
import os
from typing import Any

from kvjax.lm.hf_config import read_json


class TokenizerError(ValueError):
  """A tokenizer file that is missing, unreadable or inconsistent with the model."""


def _token_str(value: Any) -> str | None:
  if isinstance(value, dict):
    return value.get("content")
  return value


class Tokenizer:
  """Wraps `tokenizers.Tokenizer`; encodes with the file's own post-processor (e.g. BOS)."""

  def __init__(
    self,
    tok,
    *,
    bos: str | None = None,
    eos: str | None = None,
    unk: str | None = None,
    pad: str | None = None,
    chat_template: str | None = None,
    source: str = "tokenizer.json",
  ):
    self.tok = tok
    self.source = source
    self.bos, self.eos, self.unk, self.pad = bos, eos, unk, pad
    self.chat_template = chat_template
    self.bos_id = self._id(bos)
    self.eos_id = self._id(eos)
    for token in (unk, pad):
      self._id(token)  # in the vocabulary

  def _id(self, token: str | None) -> int | None:
    if token is None:
      return None
    i = self.tok.token_to_id(token)
    if i is None:
      raise TokenizerError(f"{self.source}: special token {token!r} is not in the vocabulary")
    return i

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
      raise TokenizerError(f"{path}: no tokenizer.json")
    try:
      tok = HFTokenizer.from_file(file)
    except Exception as err:
      raise TokenizerError(f"{file}: not a readable tokenizer ({err})") from None
    conf_file = os.path.join(path, "tokenizer_config.json")
    conf = read_json(conf_file, required=False, error=TokenizerError) or {}
    for what in ("bos_token", "eos_token"):
      token = _token_str(conf.get(what))
      if token is not None and tok.token_to_id(token) is None:
        raise TokenizerError(f"{conf_file}: {what} {token!r} is not in the vocabulary of {file}")
    # an unk or pad token the vocabulary lacks (transformers would add it) is left out
    unk, pad = (_token_str(conf.get(w)) for w in ("unk_token", "pad_token"))
    template = conf.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
      named = {t.get("name"): t.get("template") for t in template}
      template = named.get("default") or next(iter(named.values()), None)
    jinja_file = os.path.join(path, "chat_template.jinja")
    if template is None and os.path.exists(jinja_file):
      with open(jinja_file) as f:
        template = f.read()
    return cls(
      tok,
      bos=_token_str(conf.get("bos_token")),
      eos=_token_str(conf.get("eos_token")),
      unk=unk if unk is not None and tok.token_to_id(unk) is not None else None,
      pad=pad if pad is not None and tok.token_to_id(pad) is not None else None,
      chat_template=template,
      source=file,
    )

  def save(self, path: str) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, chat template) into
    directory `path`, as `load` and transformers read them."""
    self.tok.save(os.path.join(path, "tokenizer.json"))
    conf = {
      "bos_token": self.bos,
      "eos_token": self.eos,
      "unk_token": self.unk,
      "pad_token": self.pad,
      "chat_template": self.chat_template,
      "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
      json.dump({k: v for k, v in conf.items() if v is not None}, f, indent=2)

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode takes a str; got {type(text).__name__}")
    return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
    self, messages: list[dict[str, str]], add_generation_prompt: bool = True
  ) -> str:
    """Renders messages ([{"role": ..., "content": ...}]) with the model's jinja2 template."""
    if self.chat_template is None:
      raise TokenizerError(
        f"{self.source}: the model has no chat template "
        "(tokenizer_config.json has no chat_template)"
      )
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
      raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, indent=indent, ensure_ascii=False)
    return env.from_string(self.chat_template).render(
      messages=messages,
      add_generation_prompt=add_generation_prompt,
      bos_token=self.bos or "",
      eos_token=self.eos or "",
    )
