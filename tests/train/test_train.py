"""The LM trainer (kvjax.train.lm), its text data, CLI and HF export.

Unless a test says otherwise it trains on ONE device (data_parallel=1, no mesh) although
conftest simulates 8: `test_mesh_matches_single_device` covers the sharded path.
"""

import contextlib
import io
import json
import os

import jax
import numpy as np
import pytest
from train_data import ARCH, B, T, V, eval_batches, synthetic

from kvjax import lm
from kvjax.lm import cli as lm_cli
from kvjax.lm import tiny
from kvjax.train import cli as train_cli
from kvjax.train import metrics
from kvjax.train.lm import TrainConfig, TrainError, train
from kvjax.train.text import DataError, TextData, encode

# The compute settings of `config()` and of the CLI runs (FLAGS), which therefore share compiled
# steps.
RUN = dict(batch_size=B, seq_len=T, lr=1e-2, warmup=3, steps=30, eval_every=10, data_parallel=1)


def config(out_dir, **kw):
  """RUN as a TrainConfig writing to out_dir, logging every step; kw override."""
  return TrainConfig(**{**RUN, "out_dir": str(out_dir), "log_every": 1, **kw})


def tiny_model():
  return tiny.model(**ARCH)


def leaves(params):
  return jax.tree_util.tree_leaves_with_path(params)


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
  out = tmp_path_factory.mktemp("run30")
  return out, train(tiny_model(), config(out), synthetic, eval_batches, progress=False)


def test_thirty_steps_lower_the_loss(run30):
  _, result = run30
  losses = [r["loss"] for r in result.records]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < losses[0] - 1.0, losses
  evals = [r["eval_loss"] for r in result.records if "eval_loss" in r]
  assert len(evals) == 3 and evals[-1] < evals[0]
  assert all(np.asarray(a).dtype == np.float32 for _, a in leaves(result.model.params()))


def test_metrics_jsonl_and_png(run30):
  out, _ = run30
  records = metrics.read(str(out))
  assert [r["step"] for r in records] == list(range(1, 31))
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
  last = records[-1]
  assert last["eval_tokens"] == B * T
  # synthetic chars are 1 per token, so bits per char = nats per token / ln 2
  assert last["eval_bpc"] == pytest.approx(last["eval_loss"] / np.log(2), rel=1e-6)
  assert records[0]["lr"] == 0.0 and records[3]["lr"] == pytest.approx(1e-2)
  with open(out / metrics.PNG, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


class Interrupt(Exception):
  """Raised by the crashing batch iterator to stop a run mid-way."""


def test_resume_is_bit_identical(tmp_path, run30):
  _, full = run30  # uninterrupted: 30 steps, no checkpoint before the end

  def crashing(start):
    for i, batch in enumerate(synthetic(start), start):
      if i == 25:
        raise Interrupt
      yield batch

  cut = config(tmp_path / "cut", save_every=7, keep=2)
  with pytest.raises(Interrupt):
    train(tiny_model(), cut, crashing, eval_batches, progress=False)
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["14", "21"]  # keep=2
  resumed = train(tiny_model(), cut, synthetic, eval_batches, progress=False)
  assert resumed.resumed_from == 21
  assert [r["step"] for r in metrics.read(cut.out_dir)] == list(range(1, 31))
  a, b = dict(leaves(full.model.params())), dict(leaves(resumed.model.params()))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
  timed = ("tokens_per_s", "mfu")  # measured rates differ from run to run
  assert {k: v for k, v in resumed.records[-1].items() if k not in timed} == {
    k: v for k, v in full.records[-1].items() if k not in timed
  }
  # an iterable (not a callable) is skipped forward on resume: same result
  cut2 = config(tmp_path / "cut2", save_every=10)
  with pytest.raises(Interrupt):
    train(tiny_model(), cut2, crashing(0), progress=False)
  again = train(tiny_model(), cut2, synthetic(0), progress=False)
  assert again.resumed_from == 20
  for k, v in leaves(again.model.params()):
    np.testing.assert_array_equal(a[k], v, err_msg=str(k))


def test_resume_with_other_settings_is_refused(run30):
  out, _ = run30
  with pytest.raises(TrainError, match=r"different run.*lr"):
    train(tiny_model(), config(out, lr=5e-3), synthetic, progress=False)


def test_mesh_matches_single_device(tmp_path, run30):
  _, single = run30
  sharded = train(
    tiny_model(),
    config(tmp_path, data_parallel=2, model_parallel=2),
    synthetic,
    eval_batches,
    progress=False,
  )
  a = dict(leaves(single.model.params()))
  for k, v in leaves(sharded.model.params()):
    np.testing.assert_allclose(v, a[k], atol=2e-5, rtol=2e-4, err_msg=str(k))
  assert sharded.records[-1]["eval_loss"] == pytest.approx(
    single.records[-1]["eval_loss"], abs=1e-4
  )


def test_bf16_compute_keeps_float32_params(tmp_path, run30):
  _, f32 = run30
  result = train(tiny_model(), config(tmp_path, bf16=True), synthetic, progress=False)
  losses = [r["loss"] for r in result.records]
  assert np.isfinite(losses).all() and np.mean(losses[-5:]) < losses[0] - 1.0
  assert losses != [r["loss"] for r in f32.records]  # the forward really ran in bfloat16
  assert all(np.asarray(a).dtype == np.float32 for _, a in leaves(result.model.params()))


def test_export_loads_in_transformers(run30, tmp_path):
  import torch
  from transformers import LlamaForCausalLM

  _, result = run30
  lm.save(result.model, str(tmp_path))
  assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
    os.listdir(tmp_path)
  )
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model_type"] == "llama"
  ids = np.random.default_rng(1).integers(0, V, (2, 24))
  ours = lm.score(lm.load(str(tmp_path)), ids)
  hf = LlamaForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(ids)).logits.numpy()
  assert np.abs(theirs).max() > 1.0  # trained, not near-zero random logits
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_bad_batches_and_configs_are_rejected(tmp_path):
  def wrong_shape(start):
    while True:
      yield {
        "inputs": np.zeros((B, T + 1), np.int32),
        "targets": np.zeros((B, T), np.int32),
        "mask": np.ones((B, T), np.float32),
        "chars": np.ones((B, T), np.float32),
      }

  with pytest.raises(TrainError, match=r"inputs must be .*\[4, 32\]"):
    train(tiny_model(), config(tmp_path / "a"), wrong_shape, progress=False)

  def out_of_vocab(start):
    batch = next(synthetic(start))
    batch["targets"][0, 0] = V
    yield batch

  with pytest.raises(TrainError, match="outside"):
    train(tiny_model(), config(tmp_path / "b"), out_of_vocab, progress=False)
  with pytest.raises(TrainError, match="ended before step 2"):
    train(tiny_model(), config(tmp_path / "c"), [next(synthetic(0))], progress=False)
  with pytest.raises(TrainError, match="warmup"):
    config(tmp_path, warmup=30)
  with pytest.raises(TrainError, match="lr must be"):
    config(tmp_path, lr=0.0)
  with pytest.raises(TrainError, match="max_position"):
    train(tiny_model(), config(tmp_path / "d", seq_len=2048), synthetic, progress=False)


# --- text data ----------------------------------------------------------------------------------


def test_text_windows(tmp_path):
  tok = tiny.byte_tokenizer()
  words = ["Thé", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog."]
  text = " ".join(np.random.default_rng(3).choice(words, 150))
  _, chars = encode(text, tok)
  assert chars.sum() == len(text) and chars[0] == 0  # BOS covers no text
  path = tmp_path / "t.txt"
  path.write_text(text, encoding="utf-8")
  data = TextData(str(path), tok, seq_len=16, batch_size=3, seed=5, eval_fraction=0.2)
  b0, b1 = data.batch(0), data.batch(1)
  np.testing.assert_array_equal(b0["inputs"][:, 1:], b0["targets"][:, :-1])
  assert b0["inputs"].dtype == np.int32 and b0["mask"].dtype == np.float32
  np.testing.assert_array_equal(next(data.train_batches(1))["inputs"], b1["inputs"])
  evals = data.eval_batches()
  assert sum(b["mask"].sum() for b in evals) == (len(data.windows) - data.n_train) * 16
  # train batches draw only the first n_train windows; eval batches only the rest
  held = {w.tobytes() for w in data.windows[data.n_train :]}
  seen = {
    np.concatenate([r, t[-1:]]).tobytes()
    for i in range(20)
    for r, t in zip(data.batch(i)["inputs"], data.batch(i)["targets"])
  }
  assert len(seen) == data.n_train and not seen & held
  with pytest.raises(DataError, match="empty"):
    (tmp_path / "e.txt").write_text("  \n")
    TextData(str(tmp_path / "e.txt"), tok, seq_len=16, batch_size=3)
  with pytest.raises(DataError, match="smaller --seq-len"):
    TextData(str(path), tok, seq_len=4096, batch_size=3)


# --- command line -------------------------------------------------------------------------------


def run_cli(*argv, main=lm_cli.main):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main([str(a) for a in argv])
  return code, out.getvalue(), err.getvalue()


def train_text(root, *flags):
  """`kvjax train lm --text ROOT/corpus.txt *flags` (text_setup's corpus) -> (exit code,
  stdout, stderr)."""
  return run_cli("train", "lm", "--text", root / "corpus.txt", *flags)


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory, random_words):
  root = tmp_path_factory.mktemp("cli")
  tok = tiny.byte_tokenizer()
  tok_dir = root / "tok"
  tok_dir.mkdir()
  tok.tok.save(str(tok_dir / "tokenizer.json"))
  (tok_dir / "tokenizer_config.json").write_text(
    json.dumps({"bos_token": "<s>", "eos_token": "</s>"})
  )
  text = random_words(np.random.default_rng(0), 1500)
  (root / "corpus.txt").write_text(text, encoding="utf-8")
  return root, tok_dir


# The same architecture and compute settings as `config()` + `tiny_model()`, so the CLI runs
# reuse the compiled steps of the library tests.
FLAGS = (
  "--d-model",
  32,
  "--n-layers",
  2,
  "--n-heads",
  4,
  "--n-kv-heads",
  2,
  "--ffn-dim",
  64,
  "--max-position",
  1024,
  *(x for k, v in RUN.items() for x in ("--" + k.replace("_", "-"), v)),
  "--no-progress",
  "--json",
)


def test_cli_end_to_end_on_text(text_setup):
  root, tok_dir = text_setup
  out = root / "run"
  code, stdout, err = train_text(root, "--tokenizer", tok_dir, "--out", out, *FLAGS)
  assert code == 0, err
  summary = json.loads(stdout)
  assert summary["resumed_from"] == 0 and summary["eval_bpc"] < 5.0
  model = lm.load(summary["export"])
  assert model.cfg.d_model == 32 and model.cfg.vocab_size == V and model.tokenizer is not None
  assert model.cfg.max_position >= T
  # fine-tune the export with the same architecture, settings from a --config file
  conf = root / "ft.json"
  conf.write_text(
    json.dumps(
      {
        "text": str(root / "corpus.txt"),
        "steps": 30,
        "warmup": 3,
        "batch_size": B,
        "seq_len": T,
        "data_parallel": 1,
        "d_model": 32,
        "lr": 1e-2,
        "bf16": False,
      }
    )
  )
  code, stdout, err = run_cli(
    "lm",
    "--config",
    conf,
    "--init-from",
    summary["export"],
    "--out",
    root / "ft",
    "--no-progress",
    "--json",
    main=train_cli.main,
  )
  assert code == 0, err
  tuned = json.loads(stdout)
  assert tuned["eval_bpc"] < summary["eval_bpc"]  # 30 more steps on the same text
  assert os.path.isfile(os.path.join(tuned["export"], "model.safetensors"))


def test_init_from_other_architecture_is_a_clear_error(text_setup, run30, tmp_path):
  root, _ = text_setup
  _, result = run30
  lm.save(result.model, str(tmp_path / "base"))
  code, _, err = train_text(
    root,
    "--init-from",
    tmp_path / "base",
    "--out",
    tmp_path / "x",
    "--d-model",
    64,
    "--n-layers",
    3,
    "--steps",
    5,
    "--warmup",
    1,
  )
  assert code == 1
  assert "architecture differs" in err and "d_model=32 (requested 64)" in err
  assert "n_layers=2 (requested 3)" in err and "Traceback" not in err


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--steps", 0], "--steps: expected an integer >= 1"),
    (["--lr", "-1"], "--lr: expected a number > 0"),
    (["--steps", 5, "--warmup", 5], "--warmup (5) must be smaller than --steps (5)"),
    (["--data", "x"], "exactly one of --text FILE and --data"),
    (["--n-heads", 3], "--d-model 32 is not divisible by --n-heads 3"),
    (["--max-position", 8], "--max-position 8 is smaller than --seq-len 32"),
  ],
)
def test_bad_flags(text_setup, tmp_path, argv, message):
  root, tok_dir = text_setup
  code, _, err = train_text(
    root, "--tokenizer", tok_dir, "--out", tmp_path, "--d-model", 32, "--seq-len", T, *argv
  )
  assert code == 2 and message in err, err


def test_bad_config_file_and_missing_flags(text_setup, tmp_path):
  root, tok_dir = text_setup
  conf = tmp_path / "c.json"
  conf.write_text(json.dumps({"stepz": 3}))
  code, _, err = run_cli("train", "lm", "--config", conf)
  assert code == 2 and "unknown setting 'stepz'" in err
  conf.write_text(json.dumps({"steps": "many"}))
  code, _, err = run_cli("train", "lm", "--config", conf)
  assert code == 2 and "steps: expected an integer >= 1" in err
  code, _, err = train_text(root, "--out", tmp_path)
  assert code == 2 and "--tokenizer DIR is required with --text" in err
  code, _, err = run_cli(
    "train", "lm", "--text", tmp_path / "none.txt", "--tokenizer", tok_dir, "--out", tmp_path / "r"
  )
  assert code == 2 and "none.txt: no such file" in err
  code, _, err = train_text(
    root, "--tokenizer", tmp_path / "no_tok", "--out", tmp_path / "r", *FLAGS
  )
  assert code == 1 and "no tokenizer.json" in err
  code, _, err = run_cli("train", "eagle")
  assert code == 2 and "--target DIR_OR_NAME is required" in err
  code, _, err = run_cli("train", "coprocessor")
  assert code == 2 and "--base DIR_OR_NAME is required" in err
  code, _, err = run_cli("train", "nope")
  assert code == 2 and "invalid choice: 'nope'" in err


def test_packed_documents_do_not_attend_across_boundaries():
  from kvjax.train.lm import forward_nll

  model = tiny_model()
  rng = np.random.default_rng(2)
  a, b = rng.integers(2, V, (1, 12)), rng.integers(2, V, (1, 20))
  row = np.concatenate([a, b], axis=1)
  batch = {
    "inputs": row[:, :-1],
    "targets": row[:, 1:],
    "segment_ids": np.array([[1] * 12 + [2] * 19]),
    "positions": np.array([list(range(12)) + list(range(19))]),
  }
  nll = jax.jit(lambda params, batch: forward_nll(model, params, batch, False)[0])
  params = model.params()
  packed = np.asarray(nll(params, batch))
  alone = lambda x: np.asarray(nll(params, {"inputs": x[:, :-1], "targets": x[:, 1:]}))
  np.testing.assert_allclose(packed[:11], alone(a), atol=1e-5)
  np.testing.assert_allclose(packed[12:], alone(b), atol=1e-5)  # b's tokens see only b
  unmasked = np.asarray(nll(params, {k: batch[k] for k in ("inputs", "targets")}))
  assert np.abs(unmasked[12:] - packed[12:]).max() > 1e-3


def _poems(root, random_words):
  """root/poems/: a corpus of one genre, 3 texts of 800 `random_words` -> root."""
  rng = np.random.default_rng(1)
  (root / "poems").mkdir(parents=True)
  for i in range(3):
    (root / "poems" / f"poem{i}.txt").write_text(random_words(rng, 800), encoding="utf-8")
  return root


def _train_with_bpe(data, out) -> tuple[dict, str]:
  """`kvjax train lm --data data --vocab-size 320` for 12 steps -> (its --json summary, its
  stderr)."""
  code, stdout, err = run_cli(
    "train",
    "lm",
    "--data",
    data,
    "--vocab-size",
    320,
    "--out",
    out,
    *FLAGS[:-4],
    "--steps",
    12,
    "--eval-every",
    12,
    "--data-parallel",
    1,
    "--no-progress",
    "--json",
  )
  assert code == 0, err
  return json.loads(stdout), err  # stdout holds the one JSON object only


def test_cli_data_dir_trains_its_own_tokenizer(tmp_path, monkeypatch, random_words):
  """--data without --tokenizer: a BPE on the corpus' train split, kept in OUT/tokenizer."""
  monkeypatch.setenv("KVJAX_DATA_DIR", str(tmp_path / "tfds"))
  data, out = _poems(tmp_path / "corpus", random_words), tmp_path / "run"
  summary, err = _train_with_bpe(data, out)
  assert "BPE" in err and (out / "tokenizer" / "tokenizer.json").is_file()
  model = lm.load(summary["export"])
  tok = lm.Tokenizer.load(str(out / "tokenizer"))
  assert model.cfg.vocab_size == tok.vocab_size > 258  # merges were learned
  assert model.tokenizer.encode("to be or not") == tok.encode("to be or not")
  # `train eval` on the export reproduces the run's last validation figures
  evaluate = ("eval", "--model", summary["export"], "--data", data)
  code, stdout, err = run_cli(
    *evaluate, "--batch-size", B, "--seq-len", T, "--json", main=train_cli.main
  )
  assert code == 0, err
  got = json.loads(stdout)
  assert got["split"] == "validation" and got["tokens"] > 0
  np.testing.assert_allclose(
    [got["loss"], got["bpc"]], [summary["eval_loss"], summary["eval_bpc"]], rtol=1e-5
  )
  code, _, err = run_cli(*evaluate, "--genre", "plays", main=train_cli.main)
  assert code == 1 and "plays" in err and "poems" in err  # unknown genre: the known ones named
  (tmp_path / "x.txt").write_text("some text", encoding="utf-8")
  code, _, err = run_cli(
    "train",
    "lm",
    "--text",
    tmp_path / "x.txt",
    "--vocab-size",
    320,
    "--tokenizer",
    out / "tokenizer",
    "--out",
    tmp_path / "r2",
  )
  assert code == 2 and "--vocab-size V (>= 300) applies only to --data" in err


def test_mfu_and_step_flops(run30):
  """Every logged record carries mfu: the step's FLOPs (step_flops) per second over the
  measured matmul peak, a fraction in (0, 1]."""
  from kvjax.train.lm import step_flops

  _, result = run30
  assert all(0 < r["mfu"] <= 1 for r in result.records)
  cfg = tiny_model().cfg
  one = step_flops(cfg, 1, T)
  assert step_flops(cfg, B, T) == pytest.approx(B * one)
  # 6 FLOPs per parameter and token dominate; attention adds L * 6 * N * H * (T + 1) per token
  matmul = cfg.n_layers * (2 * 32 * 4 * 8 + 2 * 32 * 2 * 8 + 3 * 32 * 64) + 32 * cfg.vocab_size
  assert one == pytest.approx(6 * matmul * T + 6 * cfg.n_layers * 4 * 8 * (T + 1) * T)


def plateau(start, seed=0):
  """Batches after which the model stops improving on eval_batches: random targets."""
  i = start
  while True:
    rng = np.random.default_rng((seed, i))
    yield {
      "inputs": rng.integers(2, V, (B, T)).astype(np.int32),
      "targets": rng.integers(2, V, (B, T)).astype(np.int32),
      "mask": np.ones((B, T), np.float32),
      "chars": np.ones((B, T), np.float32),
    }
    i += 1


def test_keep_best_patience_and_export(tmp_path):
  """keep_best keeps the state of the best eval_bpc in OUT/best; patience stops a run whose
  eval stops improving (a checkpoint at the stop, stopped_early in the record, a rerun trains
  nothing more); `train export --step best|N` writes that state as an HF directory equal to
  the params at that step; bad steps and runs are one-line errors."""
  from kvjax.train import checkpoints
  from kvjax.train.lm import export

  out = tmp_path / "run"
  tc = config(out, steps=60, eval_every=5, keep_best=True, patience=2, save_every=5, keep=20)
  result = train(tiny_model(), tc, plateau, eval_batches, progress=False)
  evals = [r for r in result.records if "eval_bpc" in r]
  best = checkpoints.read_best(str(out))
  assert best["value"] == min(r["eval_bpc"] for r in evals)
  assert best["step"] == min(evals, key=lambda r: r["eval_bpc"])["step"]
  last = result.records[-1]
  assert last.get("stopped_early") == 1.0 and last["step"] < 60
  assert [r["step"] for r in evals][-1] == last["step"] and best["evals_since"] == 2
  again = train(tiny_model(), tc, plateau, eval_batches, progress=False)
  assert again.records == [] and again.resumed_from == last["step"]
  got = export(str(out), "best", str(tmp_path / "best"))
  loaded = lm.load(str(tmp_path / "best"))
  assert loaded.tokenizer is not None and loaded.cfg == got.cfg
  at_step = export(str(out), best["step"], str(tmp_path / "at_step"))  # the regular checkpoint
  for (_, a), (_, b) in zip(leaves(loaded.params()), leaves(at_step.params())):
    np.testing.assert_array_equal(a, b)
  assert any(
    np.any(a != b) for (_, a), (_, b) in zip(leaves(got.params()), leaves(result.model.params()))
  )
  code, stdout, err = run_cli(
    "train", "export", "--run", out, "--step", 5, "--out", tmp_path / "five", "--json"
  )
  assert code == 0, err
  assert json.loads(stdout)["step"] == 5
  assert lm.load(str(tmp_path / "five")).cfg == got.cfg
  code, _, err = run_cli("train", "export", "--run", out, "--step", 7)
  assert code == 1 and "no checkpoint 7" in err and "kept steps" in err
  code, _, err = run_cli("train", "export", "--run", tmp_path, "--step", "best")
  assert code == 1 and "is not an LM training run" in err
  code, _, err = run_cli("train", "export", "--run", out, "--step", "latest")
  assert code == 2 and "a step >= 1 or 'best'" in err
  code, _, err = run_cli("train", "export", "--run", out, "--step", 5, "--format", "eagle1")
  assert code == 2 and "--format only apply to an eagle run" in err
  with pytest.raises(TrainError, match=r"patience .* needs eval_every"):
    config(tmp_path, patience=2, eval_every=0)


def test_dropout_trains_deterministically_and_only_in_training(tmp_path, run30):
  """dropout / attn_dropout change the training forward (other params than without them),
  the same for the same seed; evaluation runs without them (eval_loss of the trained params
  equals evaluate_model's); bad rates are refused."""
  from kvjax.train.lm import evaluate_model

  kw = dict(steps=10, eval_every=10, dropout=0.2, attn_dropout=0.1)
  a = train(tiny_model(), config(tmp_path / "a", **kw), synthetic, eval_batches, progress=False)
  b = train(tiny_model(), config(tmp_path / "b", **kw), synthetic, eval_batches, progress=False)
  c = train(
    tiny_model(),
    config(tmp_path / "c", steps=10, eval_every=10),
    synthetic,
    eval_batches,
    progress=False,
  )
  for (_, x), (_, y) in zip(leaves(a.model.params()), leaves(b.model.params())):
    np.testing.assert_array_equal(x, y)
  assert any(
    np.any(x != y) for (_, x), (_, y) in zip(leaves(a.model.params()), leaves(c.model.params()))
  )
  assert a.records[-1]["eval_loss"] == pytest.approx(
    evaluate_model(a.model, eval_batches())["eval_loss"], rel=1e-5
  )
  with pytest.raises(TrainError, match="dropout must be a number in \\[0, 1\\)"):
    config(tmp_path, dropout=1.0)


def test_keep_best_without_evaluation_is_refused(tmp_path):
  with pytest.raises(TrainError, match="need held-out evaluation batches"):
    train(
      tiny_model(),
      config(tmp_path / "r", steps=4, eval_every=1, keep_best=True),
      synthetic,
      None,
      progress=False,
    )


def test_ctrl_c_says_where_to_resume(tmp_path):
  """Ctrl-C during training raises TrainInterrupted (a KeyboardInterrupt) naming the last
  step done and the latest checkpoint; the same run resumes from that checkpoint. The CLI
  prints it as one line and exits 130."""
  from kvjax.train.errors import TrainInterrupted

  out = tmp_path / "run"
  tc = config(out, steps=10, save_every=2, eval_every=0)

  def until(n):
    def batches(start, seed=0):
      for i, b in enumerate(plateau(start, seed), start):
        if i == n:
          raise KeyboardInterrupt
        yield b

    return batches

  with pytest.raises(TrainInterrupted) as info:
    train(tiny_model(), tc, until(5), progress=False)
  msg = str(info.value)
  assert "interrupted after step 5 of 10" in msg
  assert f"latest checkpoint is step 4 in {out / 'checkpoints'}" in msg and "resume" in msg
  again = train(tiny_model(), tc, plateau, progress=False)
  assert again.resumed_from == 4
  with pytest.raises(TrainInterrupted, match="no checkpoint was written yet"):
    train(tiny_model(), config(tmp_path / "r2", steps=10, save_every=4), until(2), progress=False)


def test_cli_prints_the_interrupt_message(capsys):
  """The CLIs' runner prints an interrupt's message as one line (a bare Ctrl-C: a newline)."""
  import argparse

  from kvjax.lm.cli import errors
  from kvjax.train.errors import TrainInterrupted

  p = argparse.ArgumentParser()
  p.set_defaults(
    check=lambda a: None,
    task="lm",
    run=lambda a: (_ for _ in ()).throw(TrainInterrupted("interrupted after step 3")),
  )
  assert errors.run(p, [], lambda a: f"kvjax train {a.task}") == 130
  assert capsys.readouterr().err.strip() == "kvjax train lm: interrupted after step 3"
  p.set_defaults(run=lambda a: (_ for _ in ()).throw(KeyboardInterrupt()))
  assert errors.run(p, [], lambda a: "x") == 130
  assert capsys.readouterr().err == "\n"
