"""Misuse of the one forward (`Decoder.__call__`): inputs, layer ranges, masks, positions and caches
of the wrong shape are named before anything is traced."""

import jax.numpy as jnp
import pytest
from helpers import raises

TOKENS = jnp.zeros((2, 5), jnp.int32)


EMBEDS = jnp.zeros((2, 5, 64), jnp.float32)


@pytest.fixture(scope="module")
def decoder(model):
  return model.decoder


def test_decoder_tokens_and_embeds(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, embeds=EMBEDS),
    "exactly one of tokens, embeds, hidden",
    "['tokens', 'embeds']",
  )


def test_decoder_no_input(decoder):
  raises(ValueError, lambda: decoder(), "exactly one of tokens, embeds, hidden", "none")


@pytest.mark.parametrize("layers", [(0, 4), (-1, 2), (1, 1), (2, 1)])
def test_decoder_layer_range_out_of_bounds(decoder, layers):
  raises(ValueError, lambda: decoder(TOKENS, layers=layers), f"layers={layers}", "[0, 3]")


def test_decoder_mid_range_needs_hidden(decoder):
  raises(
    ValueError, lambda: decoder(TOKENS, layers=(1, 2)), "starting at 1", "`hidden`", "not tokens"
  )
  raises(ValueError, lambda: decoder(embeds=EMBEDS, layers=(1, 2)), "starting at 1", "not embeds")
  raises(ValueError, lambda: decoder(hidden=EMBEDS), "`hidden`", "above layer 0")


def test_decoder_mask_shape(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, mask=jnp.ones((2, 5, 4), bool)),
    "mask",
    "bool[2, 5, 4]",
    "shape (2, 5, 5)",
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, mask=jnp.ones((2, 5, 5))),
    "mask must be a bool",
    "float32[2, 5, 5]",
  )


def test_decoder_positions_shape(decoder):
  raises(
    ValueError,
    lambda: decoder(TOKENS, positions=jnp.zeros((2, 4), jnp.int32)),
    "positions",
    "int32[2, 4]",
    "shape (2, 5)",
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, positions=jnp.zeros((2, 5))),
    "positions must be a integer array",
    "float32[2, 5]",
  )


def test_decoder_cache_and_n_new_mismatch(decoder):
  from kvjax.cache import KVCache

  cfg = decoder.cfg
  wrong_layers = KVCache.init(
    n_layers=cfg.n_layers + 1, batch=2, size=8, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, cache=wrong_layers),
    "the cache's slots have shape",
    f"({cfg.n_layers + 1}, 2, {cfg.n_kv_heads}, 8",
  )
  wrong_batch = KVCache.init(
    n_layers=cfg.n_layers, batch=3, size=8, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim
  )
  raises(
    ValueError,
    lambda: decoder(TOKENS, cache=wrong_batch),
    "the cache's slots have shape",
    "a batch of 2",
  )
  raises(
    ValueError, lambda: decoder(TOKENS, n_new=jnp.ones((3,), jnp.int32)), "n_new", "shape (2,)"
  )


@pytest.mark.parametrize("shape", [(2, 5, 32), (5, 64)])
def test_decoder_embeds_width(decoder, shape):
  raises(
    ValueError,
    lambda: decoder(embeds=jnp.zeros(shape)),
    "embeds must be [B, T, 64]",
    f"got {list(shape)}",
  )
  raises(
    ValueError,
    lambda: decoder(hidden=jnp.zeros(shape), layers=(1, 2)),
    "hidden must be [B, T, 64]",
    f"got {list(shape)}",
  )


@pytest.mark.parametrize("tokens", [jnp.zeros((5,), jnp.int32), jnp.zeros((2, 5), jnp.float32)])
def test_decoder_tokens_not_int_matrix(decoder, tokens):
  raises(
    ValueError,
    lambda: decoder(tokens),
    "tokens must be an int array [B, T]",
    f"{tokens.dtype}{list(tokens.shape)}",
  )
