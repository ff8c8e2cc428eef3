"""What a checkpoint's tensors say beyond their shapes: floating dtypes that disagree (loaded in
the dtype of most params, with a warning naming the others; --dtype or dtype= picks one), and
an lm_head.weight beside a config that ties the embeddings (loaded as an untied head, as
transformers does, with a warning; never dropped)."""

import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import cli
from safetensors.torch import load_file, save_file

from kvjax import lm
from kvjax.lm import MixedDtypeWarning, TiedHeadWarning

IDS = [[3, 17, 99, 250, 8, 41, 7, 300, 12, 5]]
Q0 = "model.layers.0.self_attn.q_proj.weight"


def retype(d, dtypes: dict[str, torch.dtype], default=None):
  """Rewrites d's model.safetensors with the named tensors in those dtypes (the rest in
  `default`, or as stored)."""
  file = os.path.join(d, "model.safetensors")
  tensors = load_file(file)
  for name, t in tensors.items():
    tensors[name] = t.to(dtypes.get(name, default or t.dtype))
  save_file(tensors, file, metadata={"format": "pt"})
  return tensors


@pytest.fixture
def bf16_dir(hf_dir, tmp_path):
  """A copy of the tiny llama checkpoint stored in bfloat16."""
  d = shutil.copytree(hf_dir("llama"), str(tmp_path / "bf16"))
  retype(d, {}, torch.bfloat16)
  return d


@pytest.mark.parametrize("odd", [torch.float64, torch.float16, torch.float32])
def test_one_tensor_in_another_dtype_loads_in_the_majority_dtype(bf16_dir, odd):
  stored = retype(bf16_dir, {Q0: odd})
  with pytest.warns(MixedDtypeWarning) as caught:
    model = lm.load(bf16_dir)
  (w,) = caught
  msg = str(w.message)
  assert msg.startswith(f"{bf16_dir}: the checkpoint's tensors mix floating dtypes (")
  assert f"loaded all in bfloat16, the dtype of most params, casting {Q0!r} from " in msg
  assert "\n" not in msg and w.filename == __file__  # points at the caller of lm.load
  assert {a.dtype for a in jax.tree.leaves(model.params())} == {jnp.dtype(jnp.bfloat16)}
  q = np.asarray(model.params()["blocks"]["attn"]["q"][0], np.float32)  # [D, N, H]
  want = stored[Q0].to(torch.bfloat16).float().numpy().T.reshape(q.shape)
  np.testing.assert_array_equal(q, want)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a requested dtype: every tensor cast, nothing to say
    cast = lm.load(bf16_dir, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(lm.score(cast, IDS), lm.score(model, IDS))


def test_the_dtype_holding_most_params_wins(bf16_dir):
  """Norm scales in float32 among bfloat16 matrices (a common export): bfloat16; the matrices
  in float32 and the rest (norms and the embedding) in bfloat16: float32."""
  stored = load_file(os.path.join(bf16_dir, "model.safetensors"))
  norms = {n: torch.float32 for n in stored if "norm" in n}
  retype(bf16_dir, norms)
  with pytest.warns(MixedDtypeWarning, match=r"loaded all in bfloat16.* and \d+ more"):
    assert lm.load(bf16_dir).dtype == jnp.bfloat16
  mats = {n: torch.float32 for n in stored if "proj" in n or n == "lm_head.weight"}
  retype(bf16_dir, {**mats, **dict.fromkeys(norms, torch.bfloat16)})
  with pytest.warns(MixedDtypeWarning, match="loaded all in float32"):
    assert lm.load(bf16_dir).dtype == jnp.float32


def test_the_command_line_says_it_in_one_line(bf16_dir):
  retype(bf16_dir, {Q0: torch.float64})
  code, out, err = cli("generate", "--model", bf16_dir, "--prompt", "hi", "--max-new-tokens", 2)
  assert code == 0 and out
  lines = [line for line in err.splitlines() if "warning" in line]
  assert len(lines) == 1 and lines[0].startswith(f"kvjax: warning: {bf16_dir}: the checkpoint")
  assert "Traceback" not in err


def tied_with_head(hf_dir, tmp_path, head: str):
  """The tiny Gemma checkpoint (tie_word_embeddings true, no lm_head.weight in its file) with
  an lm_head.weight added: "same" (the embedding table again) or "other" (random)."""
  d = shutil.copytree(hf_dir("gemma"), str(tmp_path / head))
  file = os.path.join(d, "model.safetensors")
  tensors = load_file(file)
  assert "lm_head.weight" not in tensors
  embed = tensors["model.embed_tokens.weight"]
  g = torch.Generator().manual_seed(0)
  tensors["lm_head.weight"] = (
    embed.clone() if head == "same" else torch.randn(embed.shape, generator=g)
  )
  save_file(tensors, file, metadata={"format": "pt"})
  return d


def test_a_different_head_beside_tied_embeddings_is_loaded_untied(hf_dir, tmp_path):
  """transformers keeps such a head (and warns): kvjax gives its logits, says so in one line,
  and saves the model untied."""
  import transformers

  d = tied_with_head(hf_dir, tmp_path, "other")
  with pytest.warns(TiedHeadWarning) as caught:
    model = lm.load(d)
  msg = str(caught[0].message)
  assert msg.startswith(os.path.join(d, "model.safetensors") + ": config.json ties the embeddings")
  assert "'lm_head.weight' differs from 'model.embed_tokens.weight'" in msg and "\n" not in msg
  assert not model.cfg.tie_embeddings
  hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
  with torch.inference_mode():
    want = hf(torch.tensor(IDS)).logits.numpy()
  assert np.abs(lm.score(model, IDS) - want).max() <= 1e-4
  tied = lm.load(hf_dir("gemma"))  # the embedding table as the head instead: other logits
  assert np.abs(lm.score(tied, IDS) - want).max() > 0.1
  lm.save(model, str(tmp_path / "saved"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    again = lm.load(str(tmp_path / "saved"))
  assert not again.cfg.tie_embeddings
  np.testing.assert_array_equal(lm.score(again, IDS), lm.score(model, IDS))
  code, _, err = cli("generate", "--model", d, "--prompt", "hi", "--max-new-tokens", 2)
  assert code == 0 and err.count("kvjax: warning: ") == 1 and "config.json ties" in err


def test_the_embedding_table_written_twice_stays_tied(hf_dir, tmp_path):
  d = tied_with_head(hf_dir, tmp_path, "same")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model = lm.load(d)
  assert model.cfg.tie_embeddings and "head" not in model.params()
  np.testing.assert_array_equal(lm.score(model, IDS), lm.score(lm.load(hf_dir("gemma")), IDS))
