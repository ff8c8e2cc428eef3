"""The published EAGLE code from PyPI (eagle-llm, specforge; installed --no-deps) and kvjax's
draft logits in the form it computes them, shared by the format tests (a tiny random target)
and the shipped SmolLM2 head's tests (the real target)."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

import jax.numpy as jnp
import numpy as np
import torch


def installed(dist: str, module: str):
  """`module` of the installed PyPI distribution `dist`, imported from where it is installed:
  under pytest's importlib mode a checkout directory named like its top-level package (eagle-
  llm's `eagle`, specforge's `specforge`) is that package."""
  root = str(importlib.metadata.distribution(dist).locate_file(""))
  top = module.split(".")[0]
  ours = lambda k: k == top or k.startswith(top + ".")
  saved = {k: sys.modules.pop(k) for k in list(sys.modules) if ours(k)}
  sys.path.insert(0, root)
  try:
    return importlib.import_module(module)
  finally:
    sys.path.remove(root)
    for k in [k for k in sys.modules if ours(k)]:
      del sys.modules[k]
    sys.modules.update(saved)


def kvjax_draft(head, model, tokens) -> np.ndarray:
  """kvjax's draft logits [1, T, V'] for the pairs (feature_i, token_{i+1}) of one sequence
  (the last token repeated as the last pair's), no draft cache."""
  dec = model.decoder
  x = jnp.asarray([tokens])
  out, _ = dec(x, return_layer_inputs=head.hc.kind == "eagle3")
  feats = head.module.feature(out.hidden, out.layer_inputs)
  nxt = jnp.asarray([tokens[1:] + [tokens[-1]]])
  h, _ = head.module(
    feats, dec.embed_tokens(nxt), cache=None, positions=jnp.arange(len(tokens))[None]
  )
  return np.asarray(head.module.logits(h, dec))


def specforge_draft(m, feats: torch.Tensor, tokens) -> np.ndarray:
  """SpecForge draft model m's logits over its draft vocabulary [T, N] for pairs (feature_i,
  token_{i+1}) through the calls its trainer makes for the first TTT step (sdpa backend), and
  (checked equal) through its forward. feats [1, T, 3D]: the target hidden states its
  eagle_config ids name, concatenated (SGLang's capture, which SpecForge trains from: id i =
  the output of layer i = the input of layer i + 1). Its torch.compile'd norms and RoPE run
  eager."""
  T = len(tokens)
  with torch.no_grad(), torch.compiler.set_stance("force_eager"):
    emb = m.embed_input_ids(torch.tensor(tokens[1:] + [tokens[-1]])[None])
    f = m.project_hidden_states(feats)
    mask = m.prepare_decoder_attention_mask(torch.ones(1, T, dtype=torch.bool), f, 1, T, 0)
    h = m.backbone(emb, f, [[], []], mask, torch.arange(T)[None])
    z = m.compute_logits(h)[0].numpy()
    np.testing.assert_allclose(m.lm_head(m(feats, emb))[0].numpy(), z, atol=1e-5, rtol=1e-5)
  return z


def hf_aux_features(m, hf, tokens) -> torch.Tensor:
  """[1, T, 3D]: transformers model hf's hidden states at the ids m's eagle_config names."""
  ids = m.config.eagle_config["eagle_aux_hidden_state_layer_ids"]
  with torch.no_grad():
    out = hf(torch.tensor(tokens)[None], output_hidden_states=True)
  return torch.cat([out.hidden_states[i + 1] for i in ids], -1)
