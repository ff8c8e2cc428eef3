"""DroidSpeak: a fine-tuned receiver reuses the KV / E cache its base model (the sender) computed
for the same prefix, recomputing only the layers a plan names.

reuse.py: `Plan` (which layers to recompute), `capture` on the sender, `receive` into the
  receiver's KVCache, `check_pair`.
payload.py: a `Capture` as versioned bytes with the sender's fingerprint, checked on arrival.
wire.py: a payload over TCP (`send`, `serve_once`).
profile.py: runs and measures plans (`compare`, `profile`, `pick`, the stored profile).

    from kvjax.lm.droidspeak import Plan, capture, receive
    plan = Plan.parse("1-3", n_layers=4)
    cache = receive(receiver, capture(sender, tokens, lengths, plan), size=256)
"""

from kvjax.lm.droidspeak import payload, profile, wire
from kvjax.lm.droidspeak.reuse import (
  Capture,
  DroidSpeakError,
  Plan,
  capture,
  check_pair,
  receive,
)

__all__ = [
  "Capture",
  "DroidSpeakError",
  "Plan",
  "capture",
  "check_pair",
  "payload",
  "profile",
  "receive",
  "wire",
]
