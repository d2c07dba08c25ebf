"""`python -m export params read|write`: the flat parameter vector (eager `get_params()`
order) of an exported file, or of a whole directory with shared ONNX weights."""

import argparse
import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from export.errors import ExportError
from export.pipeline.params import load_tensor, read_params, rewrite_shared_params, write_params
from export.store.atomic import atomic_path
from export.store.manifest import read_manifest, refuse_export_file


def run_params(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export params",
                                     description="Read or write the flat parameter vector "
                                     "(eager get_params() order) of an exported file: TorchScript "
                                     "(.pt), ONNX (.onnx), torch.export program (.ep.pt2), AOTInductor "
                                     "package (.aoti.pt2: read only; its weights are replaced at load time).")
    sub = parser.add_subparsers(dest="action", required=True)
    p_read = sub.add_parser("read", help="print the vector's size; save it with --out (.pt/.npy)")
    p_read.add_argument("onnx", type=Path, metavar="FILE", help=".pt, .onnx, .ep.pt2 or .aoti.pt2")
    p_read.add_argument("--out", type=Path)
    p_read.add_argument("--manifest", type=Path, help="manifest.json (default: beside the file)")
    p_write = sub.add_parser("write", help="write a vector (.pt/.npy) into a copy of a .pt, .onnx or "
                             ".ep.pt2 file, or (given an export directory with shared weights) into "
                             "the directory")
    p_write.add_argument("onnx", type=Path, metavar="FILE",
                         help="a .pt, .onnx or .ep.pt2 file, or an export directory exported with "
                         "--onnx-weights shared (rewritten in place, every mode and format at once)")
    p_write.add_argument("vector", type=Path)
    p_write.add_argument("--out", type=Path, help="the new file (required for a file)")
    p_write.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/inf values")
    p_write.add_argument("--manifest", type=Path, help="manifest.json (default: beside the file)")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.manifest.parent) if args.manifest else None
    if args.action == "read":
        vector = read_params(args.onnx, manifest)
        print(f"{args.onnx}: {vector.numel()} parameters, sha256 of values "
              f"{hashlib.sha256(vector.numpy().tobytes()).hexdigest()[:16]}")
        if args.out:
            refuse_export_file(args.out)
            with atomic_path(args.out) as tmp:
                if args.out.suffix == ".npy":
                    with open(tmp, "wb") as f:
                        np.save(f, vector.numpy())
                else:
                    torch.save(vector, tmp)
        return 0
    if args.onnx.is_dir():
        if args.out is not None:
            raise ExportError(f"{args.onnx} is a directory: it is rewritten in place, --out does not apply")
        rewrite_shared_params(args.onnx, torch.from_numpy(load_tensor(args.vector, "vector")), args.allow_nonfinite)
        print(f"rewrote the parameters of {args.onnx} (every mode's ONNX and TorchScript file)")
        return 0
    if args.out is None:
        raise ExportError("params write FILE VECTOR needs --out NEW.onnx (a directory with shared "
                          "weights is rewritten in place instead)")
    vector = torch.from_numpy(load_tensor(args.vector, "vector"))
    out = write_params(args.onnx, vector, args.out, manifest, args.allow_nonfinite)
    print(f"wrote {out}")
    return 0
