"""`python -m export quantize DIR --calibration DATA`: int8 ONNX per mode (onnxruntime static
quantization, QDQ, per-channel weights), recorded in the manifest."""

import argparse
from pathlib import Path
from typing import Sequence

from export.cli.options import check_option, parse_list
from export.tools.quantize import quantize_directory
from zoo.base import RETURNT_MODES


def run_quantize(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export quantize",
                                     description=__doc__)
    parser.add_argument("directory", type=Path, help="an export directory (with manifest.json)")
    parser.add_argument("--calibration", metavar="DATA",
                        help="real inputs: [N, C, H, W] .npy/.pt, or an image folder (DIR/<class>/<image>); "
                             "'random' for seeded N(0,1) inputs (random weights only). Required.")
    parser.add_argument("--samples", type=int, default=64,
                        help="calibration inputs used at most (default: %(default)s)")
    parser.add_argument("--mean", help="normalisation of image-folder inputs, one value per channel "
                        "(default: the manifest's preprocessing)")
    parser.add_argument("--std", help="see --mean")
    parser.add_argument("--modes", help="comma-separated modes (default: every exported one)")
    args = parser.parse_args(argv)
    modes = parse_list(args.modes, RETURNT_MODES, "mode") if args.modes else None
    check_option("--samples", args.samples, args.samples >= 1, "an integer >= 1")
    section = quantize_directory(args.directory, args.calibration, modes, args.samples, args.mean, args.std)
    for info in section.values():
        err = max(info["max_abs_vs_fp32"].values())
        print(f"{args.directory / info['file']}: max |int8-fp32| {err:.3g} ({info['calibration']})")
    return 0
