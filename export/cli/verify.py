"""`python -m export verify DIR`: re-check an export directory (hashes, layout, eager vs every
artifact, the flat vector each file holds)."""

import argparse
import sys
from pathlib import Path
from typing import Sequence

from export.errors import IntegrityError, ParamsError
from export.pipeline.publish import check_versions
from export.pipeline.verify import VerifyError, verify_directory
from export.store.manifest import read_manifest
from export.tools.tables import format_table


def run_verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export verify",
                                     description="Re-check an export directory: sha256 of every "
                                     "file, the flat-parameter layout, then eager vs every "
                                     "artifact (TorchScript, onnxruntime, torch.export program, "
                                     "AOTInductor package) on fresh inputs, and the flat "
                                     "parameters each holds; then every published weight "
                                     "version (its files' sha256, every file with its weights "
                                     "against eager). Exit 1 on any mismatch.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=1, help="seed of the fresh inputs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        report = verify_directory(args.directory, args.seed, args.device)
        report.rows += check_versions(args.directory, read_manifest(args.directory), args.device, args.seed)
    except (VerifyError, IntegrityError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(["mode", "output", "format", "max abs", "max rel", "status"], report.rows))
    if report.stray:
        print(f"stray files (not in the manifest; left by an interrupted or earlier run, safe to "
              f"remove): {', '.join(report.stray)}", file=sys.stderr)
    print(f"{len(report.rows) - report.failed} passed, {report.failed} failed")
    return 1 if report.failed else 0
