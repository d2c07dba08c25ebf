"""`python -m zoo list [PATTERN ...]`: the registry's inference made visible.

The table is cached (see zoo.listing): a run whose zoo sources and torch/torchvision versions
match the cache's answers without importing torch; `--refresh` describes every backbone anew.
"""

import argparse
import sys
from typing import List, Optional

from zoo.listing import CACHE_ENV, Table, table_key
from zoo.registry import match_names


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zoo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser(
        "list", help="list registered backbones with their inferred arguments",
        description=f"List registered backbones. The table is cached in ${CACHE_ENV}, else "
                    f"$XDG_CACHE_HOME/returnt-zoo, else ~/.cache/returnt-zoo, keyed by the zoo's "
                    f"sources and the torch, torchvision and Python versions.")
    p_list.add_argument("patterns", nargs="*", help="glob patterns, e.g. 'resnet*'")
    p_list.add_argument("--names", action="store_true", help="print names only")
    p_list.add_argument("--refresh", action="store_true",
                        help="ignore the cached table and describe every backbone again")
    args = parser.parse_args(argv)
    table = Table.load(table_key(), refresh=args.refresh)
    names = match_names(table.names, args.patterns or None)
    if not names:
        print(f"no backbone matches {args.patterns}; registered: {', '.join(table.names)}",
              file=sys.stderr)
        return 2
    try:
        for name in names:
            print(name if args.names else table.block(name))
    finally:
        table.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
