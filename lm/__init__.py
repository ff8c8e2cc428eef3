"""Models, loading, sampling, generation and scoring.

    from kvjax import lm
    model = lm.load("shakespeare")      # a bundled model, or a HF-format directory
    out = lm.generate(model, ["Once upon a time"], max_new_tokens=32)
    logits = lm.score(model, out.prompt_tokens[0] + out.tokens[0])
"""

from kvjax.lm.checkpoint import CheckpointError, restore_params, save_params
from kvjax.lm.config import Config, ConfigError
from kvjax.lm.decoder import Decoder, Output
from kvjax.lm.generate import Generation, generate, score, stream
from kvjax.lm.model import Model, bundled, init, load, save
from kvjax.lm.sampling import Sampling
from kvjax.lm.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "CheckpointError", "Config", "ConfigError", "Decoder", "Generation", "Model", "Output",
    "Sampling", "Tokenizer", "TokenizerError", "bundled", "generate", "init", "load",
    "restore_params", "save", "save_params", "score", "stream",
]
