"""KV cache pytrees and policies."""

from kvjax.cache.dense import KVCache

__all__ = ["KVCache"]
