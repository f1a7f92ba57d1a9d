"""`python -m bench [--quick] [--json PATH] ...`: see bench/cli.py."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
