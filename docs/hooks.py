"""MkDocs hooks (mkdocs.yml `hooks:`): run before the API reference is collected.

`mkdocs` started as a console script has the script's folder (the environment's bin/) first on
sys.path, and that folder also holds the `kvjax` console script, which griffe would take for
the package. The package itself is the repository root (package-dir {"kvjax": "."}), found
through the editable install; so the scripts' folder leaves sys.path.
"""

import os
import sys


def on_startup(*, command, dirty):
  scripts = os.path.dirname(os.path.abspath(sys.argv[0]))
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != scripts]
