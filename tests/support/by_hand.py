"""What the methods should produce, computed by hand from the model's own steps and layers: the
independent expected values that the method tests (tests/methods/) compare against."""

import jax.numpy as jnp
import numpy as np

from kvjax.lm import steps


def greedy_after(model, cache, last: int, n: int) -> list[int]:
  """Feeds token `last` to a one-row cache (`steps.extend`), then decodes n greedy tokens one
  `steps.decode_step` at a time -> those n tokens."""
  logits, cache = steps.extend(
    model.graphdef, model.state, cache, jnp.asarray([[last]]), jnp.asarray([1], jnp.int32)
  )
  out = []
  for _ in range(n):
    out.append(int(np.argmax(logits[0])))
    logits, cache = steps.decode_step(
      model.graphdef, model.state, cache, jnp.asarray([out[-1]], jnp.int32)
    )
  return out


def droidspeak_kv(sender, receiver, tokens, plan) -> tuple[np.ndarray, np.ndarray]:
  """The K/V [L, B, K, P, H] a DroidSpeak plan leaves for tokens [B, P]: the sender's in every
  layer, except each group's layers, which the receiver runs one at a time from the sender's
  hidden state entering the group (its E; the receiver's embeddings for a group at layer 0)."""
  out, _ = sender.decoder(tokens, return_kv=True, return_layer_inputs=True)
  k, v = np.array(out.k), np.array(out.v)
  dec = receiver.decoder
  for s, e in plan.groups:
    x = dec.embed_tokens(tokens) if s == 0 else out.layer_inputs[s]
    for i in range(s, e):
      step, _ = dec(
        **({"embeds": x} if i == 0 else {"hidden": x}),
        layers=(i, i + 1),
        return_kv=True,
        logits=False,
      )
      k[i], v[i] = step.k[0], step.v[0]
      x = step.hidden
  return k, v


def assert_rows_close(cache, k, v, lengths) -> None:
  """The cache's K/V equal k, v [L, B, K, S, H] in each row's first lengths[b] slots."""
  for b, n in enumerate(np.asarray(lengths)):
    np.testing.assert_allclose(np.asarray(cache.k)[:, b, :, :n], k[:, b, :, :n], atol=2e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cache.v)[:, b, :, :n], v[:, b, :, :n], atol=2e-5, rtol=0)
