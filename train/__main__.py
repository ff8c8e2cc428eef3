"""`python -m kvjax.train TASK ...`: see `kvjax.train.cli`."""

import sys

from kvjax.train.cli import main

if __name__ == "__main__":
  sys.exit(main())
