"""`python -m export versions DIR`: the published weight versions of an export directory;
`--keep K` prunes old ones, `--pin`/`--unpin` protect versions from pruning."""

import argparse
import json
from pathlib import Path
from typing import Sequence

from export.errors import ExportError
from export.pipeline.publish import pin, prune, version_table
from export.store.manifest import read_manifest
from export.tools.tables import format_table

COLUMNS = ["version", "task", "dataset", "checkpoint", "published", "size", "max |error|", "signed", "kept because"]


def _numbers(text: str) -> list:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise ExportError(f"{text!r}: expected version numbers >= 1, comma-separated (e.g. 2,5)")
    return numbers


def run_versions(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export versions",
        description="List the published weight versions of an export directory (python -m export "
                    "publish adds them), prune old ones, pin the ones to keep.")
    parser.add_argument("directory", type=Path, metavar="DIR")
    parser.add_argument("--keep", type=int, metavar="K",
                        help="remove all but the newest K versions; never a pinned one or one a "
                             "deployment serves (versions/deployed.json, written by serve and rollout)")
    parser.add_argument("--pin", type=_numbers, metavar="N[,M]", help="never prune these versions")
    parser.add_argument("--unpin", type=_numbers, metavar="N[,M]", help="let --keep prune these again")
    parser.add_argument("--json", action="store_true", help="print the version records as JSON")
    args = parser.parse_args(argv)
    if args.pin:
        pin(args.directory, args.pin, True)
    if args.unpin:
        pin(args.directory, args.unpin, False)
    if args.keep is not None:
        _, removed = prune(args.directory, args.keep)
        print(f"removed version(s) {', '.join(map(str, removed))}" if removed else "removed no version")
    manifest = read_manifest(args.directory)
    if args.json:
        print(json.dumps({k: v.model_dump(mode="json") for k, v in manifest.weight_versions.items()}, indent=2))
        return 0
    rows = version_table(args.directory, manifest)
    if not rows:
        print(f"{args.directory}: no published weight versions (python -m export publish {args.directory} CHECKPOINT)")
        return 0
    print(format_table(COLUMNS, rows))
    return 0
