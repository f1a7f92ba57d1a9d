"""`python -m dist_train ...`: the same as the `dist-train` console script."""

from .cli import exit_with, main

if __name__ == "__main__":
    exit_with(main())
