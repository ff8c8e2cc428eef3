"""`python -m kvjax.train` (also `kvjax train`): the training command line (`main`)."""

from kvjax.train.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
