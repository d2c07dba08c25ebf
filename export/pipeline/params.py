"""Flat parameter vectors of exported files (eager `get_params()` order): read them from any
format, write them into a copy of a file, or into a whole export directory with shared ONNX
weights, without exporting again.

The manifest's layout maps each slice of the vector (name, shape, offset, length, in
`parameters()` order) to where each format holds that parameter; the formats do the reading
and writing (`export.formats.base.Format.read_params` / `write_params`).
"""

import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from export.errors import ExportError, ParamsError, first_line
from export.formats import format_of_file, get_format
from export.formats.aoti import check_torch_version
from export.store.atomic import TMP_SUFFIX
from export.store.flat_vector import check_params_vector, checked_layout
from export.store.manifest import SHARED_WEIGHTS, Manifest, check_files, file_entry
from export.store.transaction import manifest_update
from export.store.versions import refuse_if_versions

TENSOR_SUFFIXES = (".npy", ".pt", ".pth", ".safetensors")


def load_tensor(path: Path, what: str = "data") -> np.ndarray:
    """A tensor file (.npy, or a torch/safetensors file holding one tensor) as numpy; one line
    for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{what} {path}: no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ExportError(f"{path}: not a readable .npy array ({first_line(exc)})") from None
    from zoo.weights import load_file

    value = load_file(path)
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"{path}: expected a tensor, found {type(value).__name__}")
    return value.detach().cpu().numpy()


def _manifest_of(path: Path, manifest: Optional[Manifest]) -> Manifest:
    from export.store.manifest import read_manifest

    if not Path(path).is_file():
        raise ExportError(f"{path}: no such file")
    return manifest if manifest is not None else read_manifest(Path(path).parent)


def read_params(path: Path, manifest: Optional[Manifest] = None) -> Tensor:
    """The flat vector an exported file of any format holds (`manifest`: its export's, default
    the manifest.json beside the file)."""
    path = Path(path)
    fmt = format_of_file(path)
    manifest = _manifest_of(path, manifest)
    if fmt == "aoti":
        check_torch_version(path.name, manifest.programs.get(path.name))
    return get_format(fmt).read_params(path, checked_layout(manifest, path, onnx=fmt == "onnx"))


def write_params(path: Path, vector: Tensor, out: Path, manifest: Optional[Manifest] = None,
                 allow_nonfinite: bool = False) -> Path:
    """A copy of an exported file at `out` with `vector` as its parameters."""
    path = Path(path)
    fmt = format_of_file(path)
    manifest = _manifest_of(path, manifest)
    return get_format(fmt).write_params(path, vector, Path(out), checked_layout(manifest, path, onnx=fmt == "onnx"),
                                        allow_nonfinite)


def rewrite_shared_params(directory: Path, vector: Tensor, allow_nonfinite: bool = False) -> Manifest:
    """Put `vector` into an export directory with shared ONNX weights, in place and atomically.

    `weights.onnx.data` (read by every mode's graph) gets the new values at the offsets the
    graphs name; the TorchScript files and torch.export programs, which hold their own copy,
    get the same vector; int8 files (quantized from the old weights) and AOTInductor packages
    (weights compiled in) are removed. All of it happens in a staging copy of the directory
    that replaces it in one step, with the manifest's hashes updated.
    """
    from export.formats.onnx import write_shared_weights

    directory = Path(directory)
    with manifest_update(directory) as (staging, manifest):
        refuse_if_versions(directory, manifest, "its weights change by publishing a new version "
                           "(python -m export publish DIR CHECKPOINT), never in place")
        if manifest.onnx_weights != "shared":
            raise ParamsError(f"{directory}: its ONNX files hold their own weights (exported "
                              "without --onnx-weights shared); write a new file with --out")
        check_files(staging, manifest)
        layout = checked_layout(manifest, staging, onnx=True)
        check_params_vector(vector, layout, allow_nonfinite)
        vector = vector.detach().cpu()
        graph = staging / next(iter(manifest.mode_files("onnx").values()))
        write_shared_weights(graph, staging / SHARED_WEIGHTS, vector, layout)
        manifest.files[SHARED_WEIGHTS] = file_entry(staging / SHARED_WEIGHTS)
        for fmt in ("torchscript", "exported"):
            for name in manifest.mode_files(fmt).values():
                new = staging / f".{name}.new{TMP_SUFFIX}"
                get_format(fmt).write_params(staging / name, vector, new, layout, allow_nonfinite)
                os.replace(new, staging / name)
                manifest.files[name] = file_entry(staging / name)
        stale = [info["file"] for info in manifest.quantized.values()]
        stale += [n for n, info in manifest.programs.items() if info.format == "aoti"]
        manifest.quantized = {}
        for name in stale:
            manifest.files.pop(name, None)
            manifest.programs.pop(name, None)
            (staging / name).unlink(missing_ok=True)
        manifest.source = {**manifest.source, "params_rewritten": True}
    return manifest
