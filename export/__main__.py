"""Entry point of `python -m export` and the `returnt-export` console script."""

from export.cli import run

if __name__ == "__main__":
    run()
