"""kvjax.train.instructions: the instruction prompts EAGLE heads self-distil on."""

import pytest

from kvjax.train import instructions


def test_prompts_are_distinct_deterministic_and_cover_every_family():
  fams = instructions.families()
  total = sum(len(v) for v in fams.values())
  assert total >= 3000 and all(len(set(v)) == len(v) for v in fams.values())
  got = instructions.prompts(1000, seed=0)
  assert len(set(got)) == 1000 and got == instructions.prompts(1000, seed=0)
  assert got != instructions.prompts(1000, seed=1)
  assert all(p and "{" not in p and "}" not in p for p in got)  # every slot filled
  family_of = {p: k for k, v in fams.items() for p in v}
  assert {family_of[p] for p in got} == set(fams)
  assert len(set(instructions.prompts(total))) == total


@pytest.mark.parametrize("n", [0, -1, 10**6, 2.5])
def test_bad_counts(n):
  with pytest.raises(ValueError, match="n must be an int in"):
    instructions.prompts(n)


def test_overlap_counts_shared_phrases():
  train = ["Explain the water cycle to a ten-year-old."]
  assert instructions.overlap(["Explain the water cycle to my cat."], train) == pytest.approx(2 / 4)
  assert instructions.overlap(["Why is the sky blue at noon?"], train) == 0.0
