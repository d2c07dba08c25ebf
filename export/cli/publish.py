"""`python -m export publish DIR CHECKPOINT [CHECKPOINT ...]`: each checkpoint's weights as the
next verified weight version of an export directory, without exporting again."""

import argparse
import sys
from pathlib import Path
from typing import Sequence

from export.pipeline.publish import publish


def run_publish(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export publish",
        description="Add weight versions (1, 2, ... as Triton numbers them) to an export directory: "
                    "each checkpoint (a backbone state_dict or a Mammoth run checkpoint) must fit the "
                    "export's backbone, arguments and parameter layout; its weights are stored once "
                    "(versions/<n>/weights.safetensors), every export file is verified against eager "
                    "with them, and the version is recorded in manifest.json. A Mammoth run's "
                    "<ckpt_name>_<task>.pt files publish in task order. Nothing is traced or exported again.",
        epilog="Examples: python -m export publish artifacts/resnet18 checkpoints/er_run_*.pt; "
               "python -m export publish artifacts/resnet18 run_3.pt --sign-key key.pem; "
               "then: python -m export versions artifacts/resnet18")
    parser.add_argument("directory", type=Path, metavar="DIR", help="an export directory")
    parser.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT")
    parser.add_argument("--sign-key", type=Path, metavar="KEY",
                        help="sign each version (OpenSSF model-signing, elliptic-curve private key in PEM); "
                             "`serve --trust-key` then accepts only versions signed with it")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="load checkpoints that are not weights-only (runs code from the file)")
    parser.add_argument("--device", default="cpu", help="where eager and the files run to verify (default: cpu)")
    args = parser.parse_args(argv)
    published = publish(args.directory, args.checkpoints, args.sign_key, args.allow_unsafe_pickle,
                        args.device, progress=lambda line: print(line, flush=True))
    print(f"{args.directory}: published {len(published)} version(s), latest {published[-1].version.number}",
          file=sys.stderr)
    return 0
