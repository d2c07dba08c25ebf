"""Entry point of `python -m export` and the `returnt-export` console script."""

import sys

from export.cli import main

if __name__ == "__main__":
    sys.exit(main())
