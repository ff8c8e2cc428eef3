"""The tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata, built with the
`tokenizers` library as transformers' GGUF loader builds it (and so as llama.cpp tokenizes).

Two kinds of vocabulary (`tokenizer.ggml.model`):

- "gpt2": byte-level BPE. `tokens` and `merges` as given; the text is split before BPE by the
  rule `tokenizer.ggml.pre` names (PRE_TOKENIZERS), byte-level throughout.
- "llama": SentencePiece-style BPE with byte fallback. `tokens`, `scores` and `token_type`; the
  merges are rebuilt from the vocabulary (each token split in two known tokens), best first: by
  score, or for Gemma files by file position (their scores do not follow the merge order). Spaces
  become "▁", with a leading "▁" when `add_space_prefix` (default true, as llama.cpp reads it).

In both, `token_type` control tokens are special added tokens (kept whole, dropped by
`decode(skip_special_tokens=True)`) and user-defined ones plain added tokens (kept whole); BOS
and EOS are prepended and appended as `add_bos_token` (default: true for "llama", false for
"gpt2") and `add_eos_token` say.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvjax.lm.tokenizer import Tokenizer, TokenizerError

KEY = "tokenizer.ggml."
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "▁"
LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre of a "gpt2" vocabulary -> how text is split before BPE: "gpt2" (GPT-2's
# own regex), "digits" (each digit alone, then GPT-2's regex: SmolLM's tokenizer.json, llama.cpp's
# "smollm") or a regex (its matches isolated, then byte-level without GPT-2's regex).
PRE_TOKENIZERS = {
  "default": "gpt2",
  "gpt2": "gpt2",
  "smollm": "digits",
  "llama-bpe": LLAMA3_SPLIT,
  "llama3": LLAMA3_SPLIT,
  "llama-v3": LLAMA3_SPLIT,
  "smaug-bpe": LLAMA3_SPLIT,
  "qwen2": QWEN2_SPLIT,
  "deepseek-r1-qwen": QWEN2_SPLIT,
}
# general.architecture values whose "llama" vocabulary ranks merges by file position, not score
POSITION_RANKED = ("gemma", "gemma2", "gemma3")


def build(metadata: dict[str, Any], *, source: str) -> Tokenizer:
  """The kvjax Tokenizer of a GGUF file's metadata (`source` names the file in errors)."""
  from tokenizers import Tokenizer as HFTokenizer

  meta = _Metadata(metadata, source)
  kind = meta.get("model", str)
  if kind == "gpt2":
    tok = HFTokenizer(_byte_level_bpe(meta))
    _byte_level_pipeline(tok, meta)
  elif kind == "llama":
    tok = HFTokenizer(_sentencepiece_bpe(meta, metadata.get("general.architecture")))
    _sentencepiece_pipeline(tok, meta)
  else:
    raise TokenizerError(
      f"{source}: {KEY}model {kind!r} is not supported; expected 'gpt2' (byte-level BPE) "
      "or 'llama' (SentencePiece BPE)"
    )
  _add_special_tokens(tok, meta)
  special = {n: meta.token(f"{n}_token_id") for n in ("bos", "eos", "unknown", "padding")}
  _post_processor(tok, meta, special["bos"], special["eos"], default_bos=kind == "llama")
  template = metadata.get("tokenizer.chat_template")
  if template is not None and not isinstance(template, str):
    raise TokenizerError(f"{source}: tokenizer.chat_template must be a string")
  return Tokenizer(
    tok,
    bos=special["bos"],
    eos=special["eos"],
    unk=special["unknown"],
    pad=special["padding"],
    chat_template=template,
    source=source,
  )


class _Metadata:
  """A file's tokenizer.ggml.* keys, read with their types checked; errors name the key."""

  def __init__(self, metadata: dict[str, Any], source: str):
    self.metadata, self.source = metadata, source
    tokens = self.get("tokens", list)
    if not tokens or not all(isinstance(t, str) for t in tokens):
      raise TokenizerError(f"{source}: {KEY}tokens must be a non-empty array of strings")
    self.tokens = tokens
    self.types = self.array("token_type", required=False)
    if self.types is None:
      self.types = np.full(len(tokens), NORMAL)

  def get(self, name: str, kind: type, default=None, *, required: bool = True):
    v = self.metadata.get(KEY + name)
    if v is None:
      if required and default is None:
        raise TokenizerError(f"{self.source}: no {KEY}{name} (the tokenizer needs it)")
      return default
    if not isinstance(v, kind):
      raise TokenizerError(f"{self.source}: {KEY}{name} must be a {kind.__name__}; got {v!r}")
    return v

  def array(self, name: str, *, required: bool = True) -> np.ndarray | None:
    """A numeric per-token array (token_type, scores), one entry per token."""
    v = self.get(name, np.ndarray, required=required)
    if v is not None and v.shape != (len(self.tokens),):
      raise TokenizerError(
        f"{self.source}: {KEY}{name} has {v.size} entries for {len(self.tokens)} tokens"
      )
    return v

  def token_id(self, name: str) -> int | None:
    """The id that key `name` (e.g. bos_token_id) holds, None when the key is absent."""
    i = self.get(name, int, required=False)
    if i is not None and not 0 <= i < len(self.tokens):
      raise TokenizerError(
        f"{self.source}: {KEY}{name} {i} is not a token id in [0, {len(self.tokens)})"
      )
    return i

  def token(self, name: str) -> str | None:
    """The token that key `name` (e.g. bos_token_id) names, None when the key is absent."""
    i = self.token_id(name)
    return None if i is None else self.tokens[i]


def _byte_level_bpe(meta: _Metadata):
  """The BPE model of a "gpt2" vocabulary, its tokens spelled in the byte alphabet."""
  from tokenizers import models, pre_tokenizers

  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  vocab = {
    t if set(t) <= alphabet else "".join(_BYTE_CHARS[b] for b in t.encode()): i
    for i, t in enumerate(meta.tokens)
  }
  merges = meta.get("merges", list)
  pairs = []
  for k, merge in enumerate(merges):
    pair = merge.split(" ") if isinstance(merge, str) else ()
    if len(pair) != 2:
      raise TokenizerError(
        f"{meta.source}: {KEY}merges[{k}] {merge!r} is not two tokens separated by a space"
      )
    pairs.append(tuple(pair))
  try:
    return models.BPE(vocab=vocab, merges=pairs)
  except Exception as err:  # tokenizers names the merge whose tokens are not in the vocabulary
    raise TokenizerError(f"{meta.source}: {KEY}merges do not fit {KEY}tokens ({err})") from None


def _byte_level_pipeline(tok, meta: _Metadata) -> None:
  """The split that `tokenizer.ggml.pre` names, byte-level pre-tokenizing and decoding."""
  from tokenizers import Regex, decoders, pre_tokenizers

  pre = meta.get("pre", str, "default")
  if pre not in PRE_TOKENIZERS:
    raise TokenizerError(
      f"{meta.source}: {KEY}pre {pre!r} (the pre-tokenizer) is not supported; expected one "
      f"of {sorted(PRE_TOKENIZERS)}"
    )
  split = PRE_TOKENIZERS[pre]
  byte_level = pre_tokenizers.ByteLevel(
    add_prefix_space=False, use_regex=split in ("gpt2", "digits")
  )
  if split == "gpt2":
    tok.pre_tokenizer = byte_level
  elif split == "digits":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  else:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(split), behavior="isolated"), byte_level]
    )
  tok.decoder = decoders.ByteLevel()


def _sentencepiece_bpe(meta: _Metadata, architecture: str | None):
  """The BPE model of a "llama" vocabulary: merges rebuilt from the tokens (see the module
  docstring); tokens that are runs of spaces respelled as runs of "▁" (Gemma's files store them
  with real spaces, which the normalised text never holds)."""
  from tokenizers import models

  tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in meta.tokens]
  if architecture in POSITION_RANKED:
    rank = -np.arange(len(tokens), dtype=np.float64)
  else:
    rank = np.asarray(meta.array("scores"), dtype=np.float64)
  vocab = {t: i for i, t in enumerate(tokens)}
  unk = meta.token_id("unknown_token_id")
  return models.BPE(
    vocab=vocab,
    merges=_merges(tokens, vocab, rank),
    unk_token=None if unk is None else tokens[unk],
    fuse_unk=True,
    byte_fallback=True,
  )


def _merges(tokens: list[str], vocab: dict[str, int], rank: np.ndarray) -> list[tuple[str, str]]:
  """Every split of a token into two tokens, best token first (rank descending); the splits of
  one token by longer left part, then longer right part, then vocabulary order of the parts."""
  get = vocab.get
  found = []  # (token index, split point), each token's splits in vocabulary order
  for i, t in enumerate(tokens):
    local = [
      (left, right, k)
      for k in range(1, len(t))
      if (left := get(t[:k])) is not None and (right := get(t[k:])) is not None
    ]
    local.sort()
    found += [(i, k) for _, _, k in local]
  if not found:
    return []
  index, split = np.array(found).T
  lengths = np.array([len(tokens[i]) for i in index])
  order = np.lexsort((split - lengths, -split, -rank[index]))  # stable: ties keep `found` order
  return [(tokens[index[j]][: split[j]], tokens[index[j]][split[j] :]) for j in order]


def _sentencepiece_pipeline(tok, meta: _Metadata) -> None:
  """Spaces as "▁" (and a leading one with add_space_prefix); decoding back, bytes fused."""
  from tokenizers import decoders, normalizers, pre_tokenizers

  prefix = meta.get("add_space_prefix", bool, True)
  steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=SPACE, prepend_scheme="first", split=False
    )
    steps.append(decoders.Strip(content=" ", left=1, right=0))
  else:
    tok.normalizer = normalizers.Replace(" ", SPACE)
  tok.decoder = decoders.Sequence(steps)


def _add_special_tokens(tok, meta: _Metadata) -> None:
  """Control tokens as special added tokens, user-defined ones as plain added tokens (both are
  matched whole in the text, before normalising). A control token that a byte-level vocabulary
  cannot spell (a llama.cpp mislabel) is left alone, as transformers leaves it."""
  from tokenizers import AddedToken, pre_tokenizers

  vocab = tok.get_vocab()
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  byte_level = meta.get("model", str) == "gpt2"
  control = [
    AddedToken(t, special=True, normalized=False)
    for t, kind in zip(meta.tokens, meta.types)
    if kind == CONTROL and (not byte_level or set(t) <= alphabet)
  ]
  user = [
    AddedToken(t, special=False, normalized=False)
    for t, kind in zip(meta.tokens, meta.types)
    if kind == USER_DEFINED and t in vocab
  ]
  tok.add_special_tokens(control)
  tok.add_tokens(user)


def _post_processor(tok, meta: _Metadata, bos, eos, *, default_bos: bool) -> None:
  """BOS before (add_bos_token) and EOS after (add_eos_token) each encoded text."""
  from tokenizers import processors

  ends = {}
  for name, token, default in (("bos", bos, default_bos), ("eos", eos, False)):
    if meta.get(f"add_{name}_token", bool, default, required=False):
      if token is None:
        raise TokenizerError(f"{meta.source}: {KEY}add_{name}_token is set but there is no {name}")
      ends[name] = token
  if not ends:
    return
  single = " ".join(
    x for x in (ends.get("bos"), "$A", ends.get("eos")) if x is not None
  )  # e.g. "<s> $A"
  tok.post_processor = processors.TemplateProcessing(
    single=single, special_tokens=[(t, tok.token_to_id(t)) for t in ends.values()]
  )


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte alphabet: each byte as a printable character (tokenizers' ByteLevel)."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
  printable += range(ord("®"), ord("ÿ") + 1)
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


_BYTE_CHARS = _bytes_to_unicode()
