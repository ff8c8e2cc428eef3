"""Training in bfloat16, a few steps each, against the same run in float32 on the same weights:
`kvjax train lm --bf16` (float32 params and optimizer, bfloat16 forward and backward), and the
EAGLE head and coprocessor trainers against a frozen target / base stored in bfloat16.

Each step's loss is within TOL of float32's: bfloat16 moves these tiny models' logits by less
than 0.01 (tests/methods/test_bfloat16.py), and a loss, a mean over B * T = 128 targets, by
about 1e-4 (2e-4 at most seen over the steps), against the 0.03 to 0.5 that four steps move
it. The coprocessor trainer runs the frozen base in float32 (its params cast), so there the
runs agree exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
from train_data import ARCH, B, T, synthetic

from kvjax import coprocessor, speculative
from kvjax.lm import tiny
from kvjax.train import coprocessor as train_cop
from kvjax.train import eagle
from kvjax.train.lm import TrainConfig, train

TOL = 1e-3
STEPS = 4


def cast(model, dtype):
  return model.with_params(jax.tree.map(lambda a: a.astype(dtype), model.params()))


def losses(result):
  return np.asarray([r["loss"] for r in result.records])


def assert_close_runs(got, want):
  assert len(got) == len(want) == STEPS and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_lm_bf16(tmp_path):
  model = tiny.model(**ARCH)
  run = dict(batch_size=B, seq_len=T, lr=1e-2, warmup=1, steps=STEPS, log_every=1)
  got, want = (
    train(
      model,
      TrainConfig(**run, bf16=bf16, out_dir=str(tmp_path / str(bf16))),
      synthetic,
      progress=False,
    )
    for bf16 in (True, False)
  )
  assert_close_runs(losses(got), losses(want))
  assert losses(want)[-1] < losses(want)[0] - 0.1  # the steps move the loss by far more
  assert {a.dtype for a in jax.tree.leaves(got.model.params())} == {jnp.dtype(jnp.float32)}


def test_eagle_head_on_a_bfloat16_target(tmp_path):
  target = tiny.model("llama", n_layers=2)
  params = target.params()
  params["head"] = params["head"] * 40.0  # peaked next-token distributions
  t16 = cast(target.with_params(params), jnp.bfloat16)
  h16 = speculative.init_head(t16, "eagle1", seed=0)
  h32 = h16.with_params(jax.tree.map(lambda a: a.astype(jnp.float32), h16.params()))
  run = dict(kind="eagle1", steps=STEPS, batch_size=B, seq_len=T, lr=3e-3, warmup=1, log_every=1)
  got = eagle.train(
    t16, h16, eagle.EagleConfig(**run, out_dir=str(tmp_path / "16")), synthetic, progress=False
  )
  want = eagle.train(
    cast(t16, jnp.float32),
    h32,
    eagle.EagleConfig(**run, out_dir=str(tmp_path / "32")),
    synthetic,
    progress=False,
  )
  assert_close_runs(losses(got), losses(want))
  assert jax.tree.leaves(got.head.params())[0].dtype == jnp.bfloat16  # saved as it came


def test_coprocessor_on_a_bfloat16_base(tmp_path):
  base = cast(tiny.model("llama", n_layers=2), jnp.bfloat16)
  c16 = coprocessor.init(base, 3, seed=0)
  c32 = c16.with_params(jax.tree.map(lambda a: a.astype(jnp.float32), c16.params))
  run = dict(steps=STEPS, batch_size=B, seq_len=T, ahead=4, points=4, lr=4e-3, log_every=1)
  got = train_cop.train(
    base,
    c16,
    train_cop.AugmentConfig(**run, out_dir=str(tmp_path / "16")),
    synthetic,
    progress=False,
  )
  want = train_cop.train(
    cast(base, jnp.float32),
    c32,
    train_cop.AugmentConfig(**run, out_dir=str(tmp_path / "32")),
    synthetic,
    progress=False,
  )
  np.testing.assert_array_equal(losses(got), losses(want))
  assert got.coprocessor.soft.dtype == jnp.bfloat16
