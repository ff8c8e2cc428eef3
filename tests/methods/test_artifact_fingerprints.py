"""EAGLE heads and coprocessors record the params they were trained against and refuse others."""

import jax
import pytest
from helpers import raises

from kvjax import lm
from kvjax.lm import tiny


def test_artifacts_record_and_check_the_params_they_were_trained_with(tmp_path):
  """A head or coprocessor made for a model records its params fingerprint; a model of the
  same architecture with other weights (a fine-tune) is refused unless allowed (a warning)."""
  from kvjax import coprocessor, speculative

  base = tiny.model("llama", seed=0)
  tuned = base.with_params(jax.tree.map(lambda a: a * 1.01, base.params()))
  speculative.save_head(speculative.init_head(base, "eagle1"), str(tmp_path / "head"))
  coprocessor.save(coprocessor.init(base, 4), str(tmp_path / "cop"))
  assert speculative.load_head(str(tmp_path / "head"), base).hc.target_fingerprint == (
    lm.params_fingerprint(base)
  )
  assert coprocessor.load(str(tmp_path / "cop"), base).cc.base_fingerprint == (
    lm.params_fingerprint(base)
  )
  raises(
    speculative.HeadError,
    lambda: speculative.load_head(str(tmp_path / "head"), tuned),
    "trained against other params",
    "allow_other_params=True",
  )
  raises(
    coprocessor.CoprocessorError,
    lambda: coprocessor.load(str(tmp_path / "cop"), tuned),
    "trained against other params",
    "allow_other_params=True",
  )
  with pytest.warns(UserWarning, match="using it anyway"):
    speculative.load_head(str(tmp_path / "head"), tuned, allow_other_params=True)
  with pytest.warns(UserWarning, match="using it anyway"):
    coprocessor.load(str(tmp_path / "cop"), tuned, allow_other_params=True)
