"""Subcommands on existing export directories: `verify` and `params`."""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from export.errors import ExportError, IntegrityError
from export.flat_params import (
    ParamsError,
    read_onnx_params,
    refuse_export_file,
    rewrite_shared_params,
    write_onnx_params,
)
from export.manifest import artifact_name, check_files, layout_problem, read_manifest, stray_files
from export.preprocessing import Normalize
from export.tables import format_table
from export.verify import eager_outputs, load_torchscript, sample_inputs, verify_onnx, verify_torchscript
from zoo.heads import BACKBONE_PREFIX
from zoo.registry import get_backbone
from zoo.weights import load_state_dict_strict


class VerifyError(ExportError):
    """Artifacts that do not match their manifest or each other."""


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

        fp32 = [artifact_name(m, "onnx") for m in manifest["modes"] if artifact_name(m, "onnx") in manifest["files"]]
        onnx_file = directory / fp32[0]  # int8 files do not hold the parameters
        net.set_params(read_onnx_params(onnx_file, manifest))
        inits = {t.name: t for t in onnx.load(str(onnx_file)).graph.initializer}
        for name, buf in net.named_buffers():
            if BACKBONE_PREFIX + name in inits:
                buf.copy_(torch.from_numpy(numpy_helper.to_array(inits[BACKBONE_PREFIX + name])))
    return net.eval()


@dataclass
class VerifyReport:
    rows: List[List[str]] = field(default_factory=list)  # mode, output, format, abs, rel, status
    stray: List[str] = field(default_factory=list)  # files the manifest does not list

    @property
    def failed(self) -> int:
        return sum(r[-1] != "ok" for r in self.rows)


def _check_layout(directory: Path, manifest: Dict[str, Any], net: torch.nn.Module) -> None:
    """The manifest's flat-parameter layout tiles the vector and names the backbone's
    parameters in parameters() order with their shapes."""
    flat = manifest["flat_params"]
    layout = flat.get("layout", [])
    problem = layout_problem(layout, flat.get("count"))
    if not problem:
        ours = [(n, list(p.shape)) for n, p in net.named_parameters()]
        theirs = [(e["name"], list(e["shape"])) for e in layout]
        if ours != theirs:
            bad = next((t for o, t in zip(ours, theirs) if o != t), None) or "its length"
            problem = f"it does not list the backbone's parameters in order (first difference: {bad})"
    if problem:
        raise VerifyError(f"{directory}: the manifest's flat-parameter layout is wrong: {problem}")


def verify_directory(directory: Path, seed: int = 1, device: str = "cpu") -> VerifyReport:
    """Hashes, layout, then eager vs every artifact (outputs on fresh inputs and the flat
    parameter vector each file holds); the rows of the report table."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if not manifest["files"]:
        raise VerifyError(f"{directory}: the manifest lists no files: nothing to verify "
                          "(re-export it)")
    check_files(directory, manifest)
    net = eager_from_artifacts(directory, manifest).to(device)
    _check_layout(directory, manifest, net)
    params = net.get_params().cpu()
    shape = [d for d in manifest["input"]["shape"][1:]]
    prep = manifest.get("preprocessing") or {}
    preprocess = Normalize(prep["mean"], prep["std"]) if prep.get("baked") else None
    inputs = sample_inputs(shape, seed=seed, images=preprocess is not None)
    report = VerifyReport(stray=stray_files(directory, manifest))
    for mode, spec in manifest["modes"].items():
        names = [o["name"] for o in spec["outputs"]]
        want = eager_outputs(net, mode, inputs, device, preprocess)
        for fmt, verify in (("torchscript", verify_torchscript), ("onnx", verify_onnx)):
            path = directory / artifact_name(mode, fmt)
            if path.name not in manifest["files"]:
                continue
            held = (load_torchscript(path).get_params() if fmt == "torchscript"
                    else read_onnx_params(path, manifest))
            report.rows.append([mode, "flat params", fmt, "-", "-",
                                "ok" if torch.equal(held.cpu(), params) else "MISMATCH"])
            for name, s in verify(path, names, inputs, want, device).items():
                report.rows.append([mode, name, fmt, f"{s['max_abs']:.2e}", f"{s['max_rel']:.2e}",
                                    "ok" if s["ok"] else "MISMATCH"])
    return report


def run_verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export verify",
                                     description="Re-check an export directory: sha256 of every "
                                     "file, the flat-parameter layout, then eager vs TorchScript "
                                     "vs onnxruntime on fresh inputs. Exit 1 on any mismatch.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=1, help="seed of the fresh inputs")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        report = verify_directory(args.directory, args.seed, args.device)
    except (VerifyError, IntegrityError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_table(["mode", "output", "format", "max abs", "max rel", "status"], report.rows))
    if report.stray:
        print(f"stray files (not in the manifest; left by an interrupted or earlier run, safe to "
              f"remove): {', '.join(report.stray)}", file=sys.stderr)
    print(f"{len(report.rows) - report.failed} passed, {report.failed} failed")
    return 1 if report.failed else 0


def _load_vector(path: Path) -> torch.Tensor:
    if path.suffix == ".npy":
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None
    from zoo.weights import load_file

    value = load_file(path)
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{path}: expected a tensor, found {type(value).__name__}")
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
    p_write = sub.add_parser("write", help="write a vector (.pt/.npy) into a copy of an ONNX file, "
                             "or (given an export directory with shared weights) into the directory")
    p_write.add_argument("onnx", type=Path, help="an ONNX file, or an export directory exported with "
                         "--onnx-weights shared (rewritten in place, every mode and format at once)")
    p_write.add_argument("vector", type=Path)
    p_write.add_argument("--out", type=Path, help="the new ONNX file (required for a file)")
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
        rewrite_shared_params(args.onnx, _load_vector(args.vector), args.allow_nonfinite)
        print(f"rewrote the parameters of {args.onnx} (every mode's ONNX and TorchScript file)")
        return 0
    if args.out is None:
        raise ExportError("params write FILE VECTOR needs --out NEW.onnx (a directory with shared "
                          "weights is rewritten in place instead)")
    out = write_onnx_params(args.onnx, _load_vector(args.vector), args.out, manifest,
                            allow_nonfinite=args.allow_nonfinite)
    print(f"wrote {out}")
    return 0
