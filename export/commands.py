"""Subcommands on existing export directories: `verify` and `params`."""

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from export.flat_params import read_onnx_params, write_onnx_params
from export.manifest import read_manifest, sha256
from export.core import SUFFIX
from export.verify import (eager_outputs, load_torchscript, sample_inputs, verify_onnx,
                           verify_torchscript)
from zoo.heads import BACKBONE_PREFIX
from zoo.registry import get_backbone
from zoo.weights import load_state_dict_strict


class VerifyError(Exception):
    """Artifacts that do not match their manifest or each other."""


def check_hashes(directory: Path, manifest: Dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded sha256 and size."""
    for name, entry in sorted(manifest.get("files", {}).items()):
        path = directory / name
        if not path.is_file():
            raise VerifyError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"] or sha256(path) != entry["sha256"]:
            raise VerifyError(f"{path}: sha256 does not match the manifest (file changed or corrupt)")


def eager_from_artifacts(directory: Path, manifest: Dict[str, Any]) -> torch.nn.Module:
    """Rebuild the eager backbone from the manifest's arguments and the artifacts' weights."""
    backbone = manifest["backbone"]
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pretrained variants: weights follow
            net = get_backbone(backbone["name"],
                               **{k: v for k, v in backbone["args"].items() if k != "weights"})
    except KeyError:
        raise VerifyError(f"{directory}: backbone {backbone['name']!r} is not registered, so the "
                          "eager reference cannot be rebuilt") from None
    ts_files = sorted(n for n in manifest["files"] if n.endswith(".pt"))
    if ts_files:
        state = load_torchscript(directory / ts_files[0]).state_dict()
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        load_state_dict_strict(net, state, what=f"{ts_files[0]}")
    else:
        import onnx
        from onnx import numpy_helper

        fp32 = [f"{m}.onnx" for m in manifest["modes"] if f"{m}.onnx" in manifest["files"]]
        onnx_file = directory / fp32[0]  # int8 files do not hold the parameters
        net.set_params(read_onnx_params(onnx_file, manifest))
        inits = {t.name: t for t in onnx.load(str(onnx_file)).graph.initializer}
        for name, buf in net.named_buffers():
            if BACKBONE_PREFIX + name in inits:
                buf.copy_(torch.from_numpy(numpy_helper.to_array(inits[BACKBONE_PREFIX + name])))
    return net.eval()


def verify_directory(directory: Path, seed: int = 1, device: str = "cpu") -> List[List[str]]:
    """Hashes, then eager vs every artifact on fresh inputs; rows of the report table."""
    manifest = read_manifest(directory)
    check_hashes(directory, manifest)
    net = eager_from_artifacts(directory, manifest).to(device)
    shape = [d for d in manifest["input"]["shape"][1:]]
    inputs = sample_inputs(shape, seed=seed)
    rows = []
    for mode, spec in manifest["modes"].items():
        names = [o["name"] for o in spec["outputs"]]
        want = eager_outputs(net, mode, inputs, device)
        for fmt, verify in (("torchscript", verify_torchscript), ("onnx", verify_onnx)):
            path = directory / f"{mode}{SUFFIX[fmt]}"
            if path.name not in manifest["files"]:
                continue
            for name, s in verify(path, names, inputs, want, device).items():
                rows.append([mode, name, fmt, f"{s['max_abs']:.2e}", f"{s['max_rel']:.2e}",
                             "ok" if s["ok"] else "MISMATCH"])
    return rows


def run_verify(argv: Sequence[str]) -> int:
    from export.cli import format_table

    parser = argparse.ArgumentParser(prog="python -m export verify",
                                     description="Re-check an export directory: sha256 of every "
                                     "file, then eager vs TorchScript vs onnxruntime on fresh inputs.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=1, help="seed of the fresh inputs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        rows = verify_directory(args.directory, args.seed, args.device)
    except VerifyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(["mode", "output", "format", "max abs", "max rel", "status"], rows))
    bad = sum(r[-1] != "ok" for r in rows)
    print(f"{len(rows) - bad} passed, {bad} failed")
    return 1 if bad else 0


def _load_vector(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path))
    from zoo.weights import load_file

    value = load_file(path)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path}: expected a tensor, found {type(value).__name__}")
    return value


def run_params(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export params",
                                     description="Read or write the flat parameter vector "
                                     "(eager get_params() order) of an exported ONNX file.")
    sub = parser.add_subparsers(dest="action", required=True)
    p_read = sub.add_parser("read", help="print the vector's size; save it with --out (.pt/.npy)")
    p_read.add_argument("onnx", type=Path)
    p_read.add_argument("--out", type=Path)
    p_read.add_argument("--manifest", type=Path, help="manifest.json (default: beside the file)")
    p_write = sub.add_parser("write", help="write a vector (.pt/.npy) into a copy of an ONNX file")
    p_write.add_argument("onnx", type=Path)
    p_write.add_argument("vector", type=Path)
    p_write.add_argument("--out", type=Path, required=True, help="the new ONNX file")
    p_write.add_argument("--allow-nonfinite", action="store_true", help="accept NaN/inf values")
    p_write.add_argument("--manifest", type=Path, help="manifest.json (default: beside the file)")
    args = parser.parse_args(argv)
    manifest = read_manifest(args.manifest.parent) if args.manifest else None
    if args.action == "read":
        vector = read_onnx_params(args.onnx, manifest)
        print(f"{args.onnx}: {vector.numel()} parameters, sha256 of values "
              f"{__import__('hashlib').sha256(vector.numpy().tobytes()).hexdigest()[:16]}")
        if args.out:
            from export.atomic import atomic_path

            with atomic_path(args.out) as tmp:
                if args.out.suffix == ".npy":
                    with open(tmp, "wb") as f:
                        np.save(f, vector.numpy())
                else:
                    torch.save(vector, tmp)
        return 0
    out = write_onnx_params(args.onnx, _load_vector(args.vector), args.out, manifest,
                            allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out}")
    return 0
