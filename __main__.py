"""`python -m kvjax ...`: the same program as the `kvjax` command."""

import sys

from kvjax.lm.cli import main

if __name__ == "__main__":
  sys.exit(main())
