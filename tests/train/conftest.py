"""Fixtures the trainer tests share."""

import numpy as np
import pytest

# Few short words: random text over them is easy for a tiny model to learn.
WORDS = [
  "to",
  "be",
  "or",
  "not",
  "that",
  "is",
  "the",
  "question",
  "whether",
  "tis",
  "nobler",
  "in",
  "mind",
]


@pytest.fixture(scope="session")
def random_words():
  """random_words(rng, n) -> n words of WORDS drawn by the numpy Generator rng, space-separated."""

  def draw(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))

  return draw
