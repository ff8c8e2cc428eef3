"""KV cache pytrees and policies: the dense cache, the StreamingLLM sink cache, the shared-prefix
cache, their views; DroidSpeak cross-model reuse in `kvjax.cache.droidspeak`."""

from kvjax.cache.dense import KVCache
from kvjax.cache.prefix import PrefixCache
from kvjax.cache.sink import SinkCache
from kvjax.cache.view import Keys, View

__all__ = ["KVCache", "Keys", "PrefixCache", "SinkCache", "View"]
