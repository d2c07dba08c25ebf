"""`python -m export accuracy DIR --data X --labels Y`: top-1 of every engine x precision the
directory can run, against the labels and against fp32, recorded in the manifest."""

import argparse
import sys
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option
from export.errors import ExportError
from export.store.atomic import write_json
from export.store.manifest import read_manifest
from export.tools.accuracy import format_accuracy, measure_accuracy, record_accuracy
from export.tools.inputs import load_inputs, load_labels


def run_accuracy(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export accuracy", description=__doc__)
    parser.add_argument("directory", type=Path, help="an export directory")
    parser.add_argument("--data", type=Path, required=True,
                        help="inputs: [N, C, H, W] .npy/.pt, or an image folder DIR/<class>/<image> "
                             "(its class indices are the labels)")
    parser.add_argument("--labels", type=Path, help="[N] integer labels (.npy/.pt); not for an image folder")
    parser.add_argument("--mean", help="normalisation of image-folder inputs (default: the manifest's)")
    parser.add_argument("--std", help="see --mean")
    parser.add_argument("--limit", type=int, help="use at most this many inputs")
    parser.add_argument("--no-record", dest="record", action="store_false",
                        help="do not write the results into the manifest")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.directory)
    check_option("--limit", args.limit, args.limit is None or args.limit >= 1, "an integer >= 1")
    x, folder_labels, source = load_inputs(args.data, manifest, args.mean, args.std)
    if folder_labels is not None and args.labels is not None:
        raise ExportError(f"--labels {args.labels}: an image folder's labels are its class folders; "
                          "drop --labels")
    if folder_labels is None and args.labels is None:
        raise ExportError(f"--data {args.data} is a tensor file: give --labels (one integer per input)")
    y = folder_labels if folder_labels is not None else load_labels(args.labels, len(x))
    x, y = x[:args.limit], y[:args.limit]
    report = measure_accuracy(args.directory, x, y, log=lambda m: print(m, file=sys.stderr))
    report["data"] = source
    print(format_accuracy(report))
    if args.record:
        record_accuracy(args.directory, report)
    if args.json:
        write_json(args.json, report)
    return 0
