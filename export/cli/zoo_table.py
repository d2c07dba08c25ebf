"""`python -m export zoo-table` (`make zoo-table`): measure every registered backbone at its
default input size and write docs/zoo.md and docs/zoo.csv (see export.tools.zoo_table). A full
run exports every backbone at full size: about half an hour on 2 cores."""

import argparse
import datetime
import sys
from pathlib import Path
from typing import Sequence

from export.errors import ExportError
from zoo.registry import REGISTRY

DOCS = Path(__file__).resolve().parents[2] / "docs"


def run_zoo_table(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    from export.tools.bench import cpu_name
    from export.tools.zoo_table import write_table

    parser = argparse.ArgumentParser(prog="python -m export zoo-table", description=__doc__)
    parser.add_argument("--names", nargs="+", metavar="PATTERN",
                        help="measure only these backbones (glob patterns, e.g. 'timm-*'); the other rows "
                             "of the existing CSV are kept")
    parser.add_argument("--md", type=Path, default=DOCS / "zoo.md", help="the Markdown table (default: %(default)s)")
    parser.add_argument("--csv", type=Path, default=DOCS / "zoo.csv", help="the CSV (default: %(default)s)")
    args = parser.parse_args(argv)
    names = REGISTRY.names(args.names) if args.names else REGISTRY.names()
    if not names:
        raise ExportError(f"--names {' '.join(args.names)}: no registered backbone matches; registered: "
                          f"{', '.join(REGISTRY.names())}")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    rows = write_table(names, args.md, args.csv, cpu_name(), date,
                       log=lambda line: tqdm.write(line, file=sys.stderr))
    print(f"{args.md}, {args.csv}: {len(rows)} backbones ({len(names)} measured now on {cpu_name()})")
    return 0
