"""`python -m export rollout DIR --version N`: move the running deployment of an export
directory to one of its published weight versions, without restarting its replicas."""

import argparse
from pathlib import Path
from typing import Sequence


def run_rollout(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export rollout",
        description="Move the deployment that serves an export directory (python -m export serve) to a "
                    "published weight version: its files are checked (sha256, and the signature when serve "
                    "was given --trust-key), then Ray Serve updates every replica in place at once; "
                    "each loads the version beside the current one and switches between batches. "
                    "Unversioned requests get the new version from then on; a replica started later comes "
                    "up on it. Rolling back is a rollout to an older version.",
        epilog="Examples: python -m export rollout artifacts/resnet18 --version 3; "
               "python -m export rollout artifacts/resnet18 --version 2 --address 10.0.0.5:6379")
    parser.add_argument("directory", type=Path, metavar="DIR", help="the served export directory")
    parser.add_argument("--version", required=True, metavar="N", help="a published version number, or latest")
    parser.add_argument("--address", help="the Ray cluster (default: $RAY_ADDRESS, else the address serve "
                                          "recorded in DIR/versions/deployed.json)")
    parser.add_argument("--app", help="the model's application name (default: the one serving DIR)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="give up when the replicas do not all serve it by then (default: %(default)s)")
    args = parser.parse_args(argv)
    from export.serving.rollout import rollout  # imports Ray

    result = rollout(args.directory, args.version, args.address, args.app, args.timeout_s)
    print(f"{result.app}: version {result.version} serving on every replica (was {result.previous}; "
          f"held: {', '.join(result.held)}) in {result.seconds:.2f} s", flush=True)
    return 0
