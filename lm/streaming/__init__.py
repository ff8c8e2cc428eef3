"""StreamingLLM (attention sinks): streaming perplexity, and endless generation or multi-turn
chat in constant memory, on `kvjax.cache.sink.SinkCache` and its Pallas kernel.

    from kvjax.lm import streaming
    streaming.perplexity(model, ids, cache="sink", n_sink=4, window=252)
    chat = streaming.Session(model, n_sink=4, window=252)
    for piece in chat.turn("ROMEO:", max_new_tokens=None):   # endless, until a stop token
      print(piece, end="")

perplexity.py: `perplexity` over the cache modes (`MODES`: dense, window, sink, recompute).
session.py: `Session`, a chat or an endless generation.
"""

from kvjax.lm.streaming.perplexity import MODES, Perplexity, perplexity
from kvjax.lm.streaming.session import Session

__all__ = ["MODES", "Perplexity", "Session", "perplexity"]
