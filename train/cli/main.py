"""`python -m kvjax.train TASK` (also `kvjax train TASK`): train or fine-tune a model (lm), score
one (eval), train an EAGLE head (eagle) or a cache coprocessor (coprocessor).

    python -m kvjax.train lm --text corpus.txt --tokenizer TOK_DIR --out run \\
        --d-model 128 --n-layers 4 --n-heads 4 --steps 2000 --batch-size 16 --seq-len 256
    python -m kvjax.train lm --config run.json          # the same settings as a JSON object
    python -m kvjax.train eval --model shakespeare --data shakespeare --split test --genre comedy
    python -m kvjax.train eagle --target shakespeare --kind eagle3 --data shakespeare --out run
    python -m kvjax.train coprocessor --base shakespeare --latents 16 --data shakespeare --out run

Settings come from flags, then `--config FILE` (a JSON object keyed by flag names with
underscores, e.g. {"d_model": 128, "bf16": true}), then the defaults. A run resumes from the
latest checkpoint in --out. At the end the model is exported as a Hugging Face directory
(--export, default OUT/model). Exit codes: 0 ok, 1 bad data/model/run (a damaged checkpoint
included), 2 bad flags (an unwritable --out or --export included, found before training
starts); every error is one line on stderr.

One module per task (lm, eval, eagle, coprocessor, export); `common` holds what they share.
"""

from __future__ import annotations

import argparse

from kvjax.lm.cli.errors import Parser, run
from kvjax.train.cli.common import PROG
from kvjax.train.cli.coprocessor import add_coprocessor
from kvjax.train.cli.eagle import add_eagle
from kvjax.train.cli.eval import add_eval
from kvjax.train.cli.export import add_export
from kvjax.train.cli.lm import add_lm


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
  parser = Parser(prog=prog, description="Train kvjax models.")
  sub = parser.add_subparsers(dest="task", metavar="TASK", required=True)
  add_lm(sub)
  add_eval(sub)
  add_eagle(sub)
  add_coprocessor(sub)
  add_export(sub)
  return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
  """Runs `PROG ARGV...`; returns the exit code (0 ok, 1 library error, 2 bad flags)."""
  return run(build_parser(prog), argv, lambda args: f"{prog} {args.task}")
