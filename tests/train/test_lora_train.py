"""LoRA fine-tuning (`kvjax train lm --init-from M --lora-rank R`, TrainConfig.lora_rank): the
factors learn, the base stays frozen, and the PEFT adapter written at the end (and by `train
export`) loads back in kvjax and in PyPI peft with the trained model's logits."""

import json
import os

import numpy as np
import pytest
import torch
from train_data import ARCH, B, T, eval_batches

from kvjax import lm
from kvjax.lm import lora, tiny
from kvjax.train import cli as train_cli
from kvjax.train import lora as lora_train
from kvjax.train.lm import TrainConfig, TrainError, train

RUN = dict(batch_size=B, seq_len=T, lr=1e-2, warmup=2, steps=20, data_parallel=1, log_every=1)


def steady(start):
  """Batch i: random inputs whose every target is token 7 (a change a few rank-4 factors over
  a frozen random model learn within 20 steps)."""
  i = start
  while True:
    rng = np.random.default_rng((0, i))
    yield {
      "inputs": rng.integers(2, 258, (B, T)).astype(np.int32),
      "targets": np.full((B, T), 7, np.int32),
      "mask": np.ones((B, T), np.float32),
      "chars": np.ones((B, T), np.float32),
    }
    i += 1


TOKENS = np.array([[5, 9, 13, 40, 41, 42, 43, 44, 45, 46, 100, 101]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny model saved as a Hugging Face directory -> (path, model)."""
  path = str(tmp_path_factory.mktemp("base"))
  model = tiny.model(**ARCH)
  lm.save(model, path)
  return path, lm.load(path)


@pytest.fixture(scope="module")
def tuned(base, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("lora_run"))
  tc = TrainConfig(**RUN, out_dir=out, lora_rank=4, lora_alpha=16.0, save_every=10, base=base[0])
  return out, train(base[1], tc, steady, eval_batches, progress=False)


def test_factors_learn_and_the_base_stays_frozen(base, tuned):
  _, result = tuned
  losses = [r["loss"] for r in result.records]
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  adapter = result.adapter
  assert adapter.config.r == 4 and adapter.config.alpha == 16.0
  assert adapter.config.base_model == base[0]
  # every Linear of both layers (the fused names of Phi-3 passed over), A [4, in] and B
  # [out, 4]; B moved off its zero start
  assert len(adapter.weights) == 2 * 7  # q, k, v, o, gate, up, down in each layer
  a, b = adapter.weights["model.layers.1.mlp.down_proj"]
  assert a.shape == (4, ARCH["ffn_dim"]) and b.shape == (ARCH["d_model"], 4)
  assert np.abs(b).max() > 1e-3
  # the merged model is the base plus the adapter, nothing else
  want = lora.merge(base[1], adapter)
  for (_, got), (_, ref) in zip(
    *(sorted(_leaves(m.params())) for m in (result.model, want)), strict=True
  ):
    np.testing.assert_allclose(got, ref, atol=1e-6)
  assert np.abs(lm.score(result.model, TOKENS) - lm.score(base[1], TOKENS)).max() > 0.1


def _leaves(params):
  import jax

  return [
    (jax.tree_util.keystr(p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(params)
  ]


def test_the_adapter_loads_in_kvjax_and_peft(base, tuned, tmp_path):
  import peft
  import transformers

  _, result = tuned
  lora.write(str(tmp_path / "a"), result.adapter)
  ours = lm.load(base[0], adapter=str(tmp_path / "a"))
  want = lm.score(result.model, TOKENS)
  assert np.abs(lm.score(ours, TOKENS) - want).max() <= 1e-5
  hf = transformers.AutoModelForCausalLM.from_pretrained(base[0]).eval()
  theirs = peft.PeftModel.from_pretrained(hf, str(tmp_path / "a")).eval()
  with torch.inference_mode():
    got = theirs(torch.tensor(TOKENS)).logits.numpy()
  assert np.abs(got - want).max() <= 1e-4


def test_cli_fine_tunes_and_exports_an_adapter(base, tuned, tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(" ".join(["to be or not to be that is the question"] * 300), encoding="utf-8")
  common = ["lm", "--text", str(corpus), "--init-from", base[0], "--steps", "6", "--warmup", "1"]
  common += ["--batch-size", "2", "--seq-len", "32", "--no-progress", "--data-parallel", "1"]
  common += ["--out", str(tmp_path / "run"), "--save-every", "3", "--json"]
  code = train_cli.main([*common, "--lora-rank", "2", "--lora-targets", "q_proj,v_proj"])
  out, err = capsys.readouterr()
  assert code == 0, err
  summary = json.loads(out)
  assert summary["export"] == str(tmp_path / "run" / "adapter")
  D, H = ARCH["d_model"], ARCH["head_dim"]
  assert summary["n_params"] == 2 * 2 * ((D + 4 * H) + (D + 2 * H))  # layers x r x (q + v)
  adapter = lora.read(summary["export"])
  assert sorted(adapter.config.target_modules) == ["q_proj", "v_proj"]
  model = lm.load(base[0], adapter=summary["export"])
  # `train export` of the last kept step writes the same adapter
  code = train_cli.main(["export", "--run", str(tmp_path / "run"), "--step", "6", "--json"])
  out, err = capsys.readouterr()
  assert code == 0, err
  again = lm.load(base[0], adapter=json.loads(out)["out"])
  assert json.loads(out)["out"].endswith("adapter-6")
  np.testing.assert_allclose(lm.score(again, TOKENS), lm.score(model, TOKENS), atol=1e-6)


def test_bad_lora_flags(base, tmp_path, capsys):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("to be or not " * 200, encoding="utf-8")
  args = [
    "lm",
    "--text",
    str(corpus),
    "--out",
    str(tmp_path / "r"),
    "--steps",
    "3",
    "--warmup",
    "1",
  ]
  assert train_cli.main([*args, "--lora-rank", "2", "--tokenizer", base[0]]) == 2
  assert (
    "--lora-rank R fine-tunes a pretrained model: pass --init-from MODEL" in capsys.readouterr().err
  )
  code = train_cli.main(
    [*args, "--init-from", base[0], "--lora-rank", "2", "--lora-targets", "q_proj,wq"]
  )
  assert code == 1
  err = capsys.readouterr().err
  assert "LoRA targets ['wq'] are not Linear layers of this llama model; it has q_proj" in err
  with pytest.raises(TrainError, match="lora_rank must be an int >= 0"):
    TrainConfig(**RUN, out_dir=str(tmp_path), lora_rank=-1)
  with pytest.raises(TrainError, match="lora_targets must be Linear names"):
    TrainConfig(**RUN, out_dir=str(tmp_path), lora_rank=2, lora_targets="q_proj")


def test_resumed_lora_run_is_bit_identical(base, tuned, tmp_path):
  """A run stopped at a checkpoint and resumed ends with the uninterrupted run's factors."""
  out, full = tuned
  half = str(tmp_path / "half")
  tc = TrainConfig(**{**RUN, "steps": 20}, out_dir=half, lora_rank=4, lora_alpha=16.0,
                   save_every=10, base=base[0])  # fmt: skip

  class Interrupt(Exception):
    """Raised by the crashing batch iterator to stop the run mid-way."""

  def crashing(start):
    for i, batch in enumerate(steady(start), start):
      if i == 12:
        raise Interrupt
      yield batch

  with pytest.raises(Interrupt):
    train(base[1], tc, crashing, eval_batches, progress=False)
  resumed = train(base[1], tc, steady, eval_batches, progress=False)
  assert resumed.resumed_from == 10
  for module, (a, b) in full.adapter.weights.items():
    np.testing.assert_array_equal(resumed.adapter.weights[module][0], a)
    np.testing.assert_array_equal(resumed.adapter.weights[module][1], b)
  assert os.path.isdir(out)


def test_default_targets_follow_the_family():
  """The default targets are every attention and MLP projection under the family's own names
  (Phi-3's fused qkv_proj and gate_up_proj), stacked over the layers that have them."""
  llama = [p.name for p in lora_train.targets(tiny.config("llama"))]
  assert llama == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  places = lora_train.targets(tiny.config("phi3"))
  assert [p.name for p in places] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
  qkv = places[0]
  assert qkv.shape == (4 * 16 + 2 * 2 * 16, 64) and len(qkv.paths) == 3
  assert qkv.layers == (0, 1) and qkv.indices == (0, 1)
