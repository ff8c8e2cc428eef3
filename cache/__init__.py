"""KV cache pytrees and policies: the dense cache, the StreamingLLM sink cache, the shared-prefix
cache, their views, and the protocol every cache satisfies (`Cache`)."""

from kvjax.cache.dense import KVCache
from kvjax.cache.prefix import PrefixCache
from kvjax.cache.protocol import Cache
from kvjax.cache.sink import SinkCache
from kvjax.cache.view import Keys, Slots, View

__all__ = ["Cache", "KVCache", "Keys", "PrefixCache", "SinkCache", "Slots", "View"]
