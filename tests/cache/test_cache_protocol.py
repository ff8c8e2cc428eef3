"""Every cache the decoder takes satisfies the written protocol (`kvjax.cache.Cache`) and
hands its layers a `Slots` record of the layout [L, B, K, S, H]."""

import jax.numpy as jnp
import pytest

from kvjax import speculative
from kvjax.cache import Cache, KVCache, PrefixCache, SinkCache, Slots
from kvjax.lm import tiny
from kvjax.speculative import head as heads

L, B, K, S, H = 2, 3, 2, 8, 4


def caches():
  dense = KVCache.init(n_layers=L, batch=B, size=S, n_kv_heads=K, head_dim=H)
  sink = SinkCache.init(n_layers=L, batch=B, n_sink=2, window=S - 2, n_kv_heads=K, head_dim=H)
  prefix = PrefixCache(KVCache.init(n_layers=L, batch=1, size=5, n_kv_heads=K, head_dim=H), dense)
  return {"dense": dense, "sink": sink, "prefix": prefix}


@pytest.mark.parametrize("name", ["dense", "sink", "prefix"])
def test_cache_types_satisfy_the_protocol(name):
  cache = caches()[name]
  assert isinstance(cache, Cache)
  slots = cache.slots()
  assert isinstance(slots, Slots) and slots.k.shape == (L, B, K, S, H) == slots.v.shape
  assert (slots.shared_k is None) == (name != "prefix")
  if name == "prefix":
    assert slots.shared_k.shape == (L, K, 5, H)
  assert (cache.size, cache.batch, cache.length.shape) == (S, B, (B,))
  view = cache.view(2)
  assert view.new_pos.shape == (B, 2)


def test_the_eagle_heads_cache_satisfies_the_protocol():
  model = tiny.model()
  head = speculative.init_head(model, "eagle1", seed=0)
  cache = heads.new_cache(head.hc, 2, 16, model.dtype)
  assert isinstance(cache, Cache) and cache.slots().k.shape[:2] == (1, 2)


def test_an_object_missing_a_method_is_not_a_cache():
  class Half:
    size, batch, length = S, B, jnp.zeros((B,), jnp.int32)

    def view(self, T, positions=None, mask=None): ...

  assert not isinstance(Half(), Cache)
