"""LoRA adapters in PEFT's format (`lm.load(base, adapter=DIR)`, `kvjax.lm.lora`): kvjax's merged
logits against PyPI peft's on the same adapter, and every refusal."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import prompts

from kvjax import lm
from kvjax.lm import lora

TOKENS = np.array(prompts(lengths=(20, 20)))
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_adapter(base_dir, out, **config):
  """A PEFT adapter for the checkpoint at base_dir with random (nonzero) A and B, saved at
  out -> the PEFT model (unmerged) to compare against."""
  import peft
  import transformers

  torch.manual_seed(0)
  hf = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
  model = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **config)).eval()
  with torch.no_grad():  # B at the scale of A, so that the change moves the logits by O(1)
    for name, p in model.named_parameters():
      if "lora_B" in name or "lora_embedding_B" in name:
        p.normal_(0.0, 0.3)
  model.save_pretrained(out)
  return model


def logits(model, tokens):
  with torch.inference_mode():
    return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize(
  "family, config",
  [
    ("llama", dict(r=4, lora_alpha=8, target_modules=LINEARS)),
    # a regex target, a per-module alpha and an adapted embedding table
    (
      "qwen2",
      dict(
        r=2,
        lora_alpha=4,
        target_modules=r".*\.(q_proj|v_proj|down_proj|embed_tokens)",
        alpha_pattern={"down_proj": 16},
      ),
    ),
    ("phi3", dict(r=3, lora_alpha=6, target_modules=["qkv_proj", "gate_up_proj", "o_proj"])),
  ],
)
def test_merged_logits_match_peft(hf_dir, tmp_path, family, config):
  base = hf_dir(family)
  reference = peft_adapter(base, str(tmp_path / "a"), **config)
  model = lm.load(base, adapter=str(tmp_path / "a"))
  want = logits(reference, TOKENS)
  assert np.abs(lm.score(model, TOKENS) - want).max() <= 1e-4
  moved = np.abs(lm.score(lm.load(base), TOKENS) - want).max()
  assert moved > 0.1, f"the adapter moves the logits by only {moved:.3g}: the test cannot fail"


def test_written_adapter_reads_back_and_loads_in_peft(hf_dir, tmp_path):
  import peft
  import transformers

  base = hf_dir("llama")
  peft_adapter(base, str(tmp_path / "a"), r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
  adapter = lora.read(str(tmp_path / "a"))
  lora.write(str(tmp_path / "b"), adapter)
  again = lora.read(str(tmp_path / "b"))
  assert again.weights.keys() == adapter.weights.keys() and again.config.r == 4
  hf = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
  theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "b")).eval()
  ours = lm.load(base, adapter=str(tmp_path / "b"))
  assert np.abs(lm.score(ours, TOKENS) - logits(theirs, TOKENS)).max() <= 1e-4


@pytest.fixture(scope="module")
def adapter_dir(hf_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("adapter"))
  peft_adapter(hf_dir("llama"), out, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
  return out


def edited(adapter_dir, tmp_path, config=None, tensors=None):
  """A copy of adapter_dir with config fields replaced and tensors edited by tensors(dict)."""
  from safetensors.numpy import load_file, save_file

  out = tmp_path / "edited"
  out.mkdir(parents=True)
  raw = json.loads(Path(adapter_dir, lora.CONFIG).read_text())
  raw.update(config or {})
  (out / lora.CONFIG).write_text(json.dumps(raw))
  t = load_file(os.path.join(adapter_dir, lora.WEIGHTS))
  if tensors:
    tensors(t)
  save_file(t, str(out / lora.WEIGHTS))
  return str(out)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
  "config, match",
  [
    (dict(use_rslora=True), r"rsLoRA .* not supported \(use_rslora=True\)"),
    (dict(use_dora=True), r"DoRA .* not supported"),
    (dict(bias="all"), r"trained biases .* not supported"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save .* not supported"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out .* not supported"),
    (dict(peft_type="IA3"), "peft_type 'IA3'; only LORA"),
    (dict(r=0), r"r must be an int >= 1; got 0"),
    (dict(lora_alpha=-1), r"lora_alpha must be a number > 0; got -1"),
    (dict(target_modules=[]), "target_modules must be"),
  ],
)
def test_unsupported_configs_are_refused_by_name(adapter_dir, tmp_path, config, match):
  with pytest.raises(lora.LoraError, match=match):
    lm.load("unused", adapter=edited(adapter_dir, tmp_path, config=config))


def test_bad_tensors_are_refused(adapter_dir, hf_dir, tmp_path):
  base = hf_dir("llama")

  def drop_b(t):
    del t[Q_A.replace("lora_A", "lora_B")]

  with pytest.raises(lora.LoraError, match="expected both lora_A and lora_B"):
    lora.read(edited(adapter_dir, tmp_path / "1", tensors=drop_b))

  def rank(t):
    t[Q_A] = t[Q_A][:2]

  with pytest.raises(lora.LoraError, match="disagree on the rank"):
    lora.read(edited(adapter_dir, tmp_path / "2", tensors=rank))

  def nan(t):
    t[Q_A][0, 0] = np.nan

  with pytest.raises(lora.LoraError, match="non-finite"):
    lora.read(edited(adapter_dir, tmp_path / "3", tensors=nan))

  def stray(t):
    t["base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector"] = np.ones(4, np.float32)

  with pytest.raises(lora.LoraError, match="not a LoRA A or B matrix"):
    lora.read(edited(adapter_dir, tmp_path / "4", tensors=stray))

  def other_module(t):
    for k in list(t):
      t[k.replace("layers.0.", "layers.7.")] = t.pop(k)

  with pytest.raises(lora.LoraError, match=r"adapts 'model\.layers\.7\.self_attn\.q_proj', which"):
    lm.load(base, adapter=edited(adapter_dir, tmp_path / "5", tensors=other_module))

  def wider(t):
    t[Q_A] = np.concatenate([t[Q_A], t[Q_A]], axis=1)

  with pytest.raises(lora.LoraError, match=r"B A is \(64, 128\); the model's weight is \(64, 64\)"):
    lm.load(base, adapter=edited(adapter_dir, tmp_path / "6", tensors=wider))


def test_an_embedding_adapter_on_a_tied_table_is_refused(hf_dir, tmp_path):
  """PEFT adds an adapted embedding's change to the looked-up rows only: a head tied to the
  table (or Gemma's scaled rows) would take the change too once merged."""
  base = hf_dir("gemma")
  peft_adapter(base, str(tmp_path / "a"), r=2, lora_alpha=2, target_modules=["embed_tokens"])
  with pytest.raises(lora.LoraError, match="ties its output head to its embedding table"):
    lm.load(base, adapter=str(tmp_path / "a"))


def test_missing_or_corrupt_files(adapter_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="no such adapter directory"):
    lora.read(str(tmp_path / "absent"))
  d = tmp_path / "corrupt"
  d.mkdir()
  (d / lora.CONFIG).write_text(Path(adapter_dir, lora.CONFIG).read_text())
  with pytest.raises(lora.LoraError, match=r"no adapter_model\.safetensors"):
    lora.read(str(d))
  (d / "adapter_model.bin").write_bytes(b"x")
  with pytest.raises(lora.LoraError, match=r"found adapter_model.bin: only safetensors"):
    lora.read(str(d))
  (d / lora.WEIGHTS).write_bytes(b"\x00" * 10)
  with pytest.raises(lora.LoraError, match="not a readable safetensors file"):
    lora.read(str(d))
  with pytest.raises(ValueError, match="needs weights=True"):
    lm.load("unused", adapter=adapter_dir, weights=False)


def test_cli_adapter_flag(tmp_path):
  """`kvjax generate --adapter DIR` decodes the merged model; a bad adapter is one line."""
  from helpers import cli

  from kvjax.lm import tiny

  base = str(tmp_path / "base")
  lm.save(tiny.model("llama", n_layers=2), base)
  peft_adapter(base, str(tmp_path / "a"), r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
  args = ("generate", "--model", base, "--prompt", "Hello", "--max-new-tokens", 6, "--json")
  code, out, err = cli(*args, "--adapter", tmp_path / "a")
  assert code == 0, err
  merged = lm.load(base, adapter=str(tmp_path / "a"))
  want = lm.generate(merged, "Hello", max_new_tokens=6).tokens
  assert json.loads(out)["tokens"] == want
  assert want != lm.generate(lm.load(base), "Hello", max_new_tokens=6).tokens  # it can fail
  code, _, err = cli(*args, "--adapter", tmp_path / "absent")
  assert code == 1 and "no such adapter directory" in err and "Traceback" not in err


def test_a_shipped_fine_tune_loads_by_name(tmp_path, monkeypatch):
  """A folder under lm/adapters/ is a model name: its base (adapter_config.json's
  base_model_name_or_path) with the adapter merged; `kvjax models` lists it."""
  import dataclasses

  from helpers import cli

  from kvjax.lm import tiny

  base = str(tmp_path / "base")
  lm.save(tiny.model("llama", n_layers=2), base)
  shipped = tmp_path / "adapters"
  peft_adapter(base, str(shipped / "tiny-tuned"), r=2, lora_alpha=4, target_modules=["v_proj"])
  cfg = json.loads((shipped / "tiny-tuned" / lora.CONFIG).read_text())
  assert cfg["base_model_name_or_path"] == base  # PEFT records the path it loaded
  monkeypatch.setattr(lora, "ADAPTERS", dataclasses.replace(lora.ADAPTERS, shipped_in=str(shipped)))
  assert lora.shipped() == ("tiny-tuned",)
  by_name = lm.load("tiny-tuned")
  want = lm.load(base, adapter=str(shipped / "tiny-tuned"))
  ids = [[5, 9, 13, 40, 41, 100, 101]]
  np.testing.assert_array_equal(lm.score(by_name, ids), lm.score(want, ids))
  code, out, err = cli("models", "--json")
  assert code == 0, err
  assert json.loads(out)["fine_tunes"] == [{"name": "tiny-tuned", "base": base, "installed": True}]
  lm.model.find("tiny-tuned")  # --model's early check accepts it
  assert lm.load("tiny-tuned", weights=False).cfg == want.cfg  # the config alone
  with pytest.raises(FileNotFoundError, match=r"a shipped fine-tune's \(tiny-tuned\)"):
    lm.load("no-such-model")
