"""`python -m dist_train ...`: the same as the `dist-train` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
