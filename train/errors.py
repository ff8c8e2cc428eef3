"""The errors a training run raises (every task's, the loop's and its checkpoints')."""


class TrainError(ValueError):
  """A training setup that cannot run (bad hyperparameters, mismatched resume, bad batch)."""


class TrainInterrupted(KeyboardInterrupt):
  """Ctrl-C during training; its message says where the run stopped and how to resume."""
