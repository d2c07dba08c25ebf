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
    rewrite_shared_params,
    write_onnx_params,
)
from export.flat_vector import checked_layout
from export.manifest import (
    ARTIFACT_SUFFIX,
    artifact_name,
    artifacts,
    check_files,
    layout_problem,
    read_manifest,
    refuse_export_file,
    stray_files,
)
from export.preprocessing import Normalize
from export.tables import format_table
from export.verify import VERIFIERS, eager_outputs, load_torchscript, sample_inputs
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
    programs = sorted(n for n in manifest["files"] if n.endswith(ARTIFACT_SUFFIX["exported"]))
    if ts_files or programs:
        if ts_files:
            state = load_torchscript(directory / ts_files[0]).state_dict()
        else:
            from export.program_export import load_program

            state = load_program(directory / programs[0]).state_dict
        state = {k[len(BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
        load_state_dict_strict(net, state, what=f"{(ts_files or programs)[0]}")
    else:
        import onnx
        from onnx import numpy_helper

        fp32 = [artifact_name(m, "onnx") for m in manifest["modes"] if artifact_name(m, "onnx") in manifest["files"]]
        onnx_file = directory / fp32[0]  # int8 files do not hold the parameters
        net.set_params(read_onnx_params(onnx_file, manifest))
        inits = {t.name: t for t in onnx.load(str(onnx_file)).graph.initializer}
        for name, buf in net.named_buffers():
            if BACKBONE_PREFIX + name in inits:
                # torch.tensor copies: onnx's array is read-only, which torch.from_numpy warns about
                buf.copy_(torch.tensor(numpy_helper.to_array(inits[BACKBONE_PREFIX + name])))
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
    wanted: Dict[Any, Any] = {}
    for mode, fmt, name, batch in artifacts(manifest):
        path = directory / name
        outputs = [o["name"] for o in manifest["modes"][mode]["outputs"]]
        ins = inputs if batch is None else sample_inputs(shape, seed=seed, images=preprocess is not None,
                                                         batches=(batch,))
        if (mode, batch) not in wanted:
            wanted[mode, batch] = eager_outputs(net, mode, ins, device, preprocess)
        label = fmt if batch is None else f"{fmt} b{batch}"
        report.rows.append([mode, "flat params", label, "-", "-",
                            "ok" if _holds_params(path, fmt, manifest, params, device) else "MISMATCH"])
        for output, s in VERIFIERS[fmt](path, outputs, ins, wanted[mode, batch], device).items():
            report.rows.append([mode, output, label, f"{s['max_abs']:.2e}", f"{s['max_rel']:.2e}",
                                "ok" if s["ok"] else "MISMATCH"])
    return report


def _holds_params(path: Path, fmt: str, manifest: Dict[str, Any], params: torch.Tensor, device: str) -> bool:
    """Whether the file holds the eager flat vector: all of it, bit for bit (an AOTInductor
    package: every parameter its mode reads, which is all it holds)."""
    layout = checked_layout(manifest, path)
    if fmt == "torchscript":
        return torch.equal(load_torchscript(path).get_params().cpu(), params)
    if fmt == "onnx":
        return torch.equal(read_onnx_params(path, manifest), params)
    if fmt == "exported":
        from export.program_export import load_program, program_params

        return torch.equal(program_params(load_program(path), layout, path.name), params)
    from export.aoti_export import check_torch_version, package_constants

    check_torch_version(path.name, manifest["programs"][path.name])
    held = package_constants(path, layout, path.name, device)
    return bool(held) and all(torch.equal(held[e["name"]], params[e["offset"]:e["offset"] + e["length"]])
                              for e in layout if e["name"] in held)


def run_verify(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export verify",
                                     description="Re-check an export directory: sha256 of every "
                                     "file, the flat-parameter layout, then eager vs every "
                                     "artifact (TorchScript, onnxruntime, torch.export program, "
                                     "AOTInductor package) on fresh inputs, and the flat "
                                     "parameters each holds. Exit 1 on any mismatch.")
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


def _kind(path: Path) -> str:
    """onnx, exported or aoti, from the file name; one line for anything else."""
    name = path.name
    if name.endswith(".onnx"):
        return "onnx"
    if name.endswith(ARTIFACT_SUFFIX["exported"]):
        return "exported"
    if ".aoti." in name and name.endswith(".pt2"):
        return "aoti"
    raise ExportError(f"{path}: expected an exported .onnx, .ep.pt2 or .aoti.pt2 file "
                      "(TorchScript files have get_params/set_params of their own)")


def read_params(path: Path, manifest=None) -> torch.Tensor:
    """The flat vector an exported file holds (eager get_params() order)."""
    kind = _kind(path)
    if kind == "onnx":
        return read_onnx_params(path, manifest)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    manifest = manifest if manifest is not None else read_manifest(path.parent)
    layout = checked_layout(manifest, path)
    if kind == "exported":
        from export.program_export import load_program, program_params

        return program_params(load_program(path), layout, path)
    from export.aoti_export import check_torch_version, package_params

    check_torch_version(path.name, (manifest.get("programs") or {}).get(path.name, {}))
    return package_params(path, layout, path.name)


def write_params(path: Path, vector: torch.Tensor, out: Path, manifest=None,
                 allow_nonfinite: bool = False) -> Path:
    """A copy of an exported file with `vector` as its parameters."""
    kind = _kind(path)
    if kind == "onnx":
        return write_onnx_params(path, vector, out, manifest, allow_nonfinite=allow_nonfinite)
    if kind == "aoti":
        raise ExportError(f"{path}: an AOTInductor package's weights are compiled into its shared "
                          "library and torch cannot rewrite them in the file; replace them when "
                          "loaded (export.runtime.load(DIR, engine='aoti').set_params(v), C++: "
                          "AOTIModelPackageLoader::load_constants) or re-export")
    from export.program_export import write_program_params

    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    manifest = manifest if manifest is not None else read_manifest(path.parent)
    return write_program_params(path, vector, out, checked_layout(manifest, path), allow_nonfinite)


def run_params(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m export params",
                                     description="Read or write the flat parameter vector "
                                     "(eager get_params() order) of an exported file: ONNX "
                                     "(.onnx), torch.export program (.ep.pt2), AOTInductor package "
                                     "(.aoti.pt2: read only; its weights are replaced at load time).")
    sub = parser.add_subparsers(dest="action", required=True)
    p_read = sub.add_parser("read", help="print the vector's size; save it with --out (.pt/.npy)")
    p_read.add_argument("onnx", type=Path, metavar="FILE", help=".onnx, .ep.pt2 or .aoti.pt2")
    p_read.add_argument("--out", type=Path)
    p_read.add_argument("--manifest", type=Path, help="manifest.json (default: beside the file)")
    p_write = sub.add_parser("write", help="write a vector (.pt/.npy) into a copy of an .onnx or "
                             ".ep.pt2 file, or (given an export directory with shared weights) into "
                             "the directory")
    p_write.add_argument("onnx", type=Path, metavar="FILE",
                         help="an .onnx or .ep.pt2 file, or an export directory exported with "
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
    out = write_params(args.onnx, _load_vector(args.vector), args.out, manifest, args.allow_nonfinite)
    print(f"wrote {out}")
    return 0
