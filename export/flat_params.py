"""Flat parameter vectors of exported ONNX files: read them, write new ones (no re-export).

The manifest's layout maps each slice of the eager `get_params()` vector (name, shape, offset,
length, in `parameters()` order) to the ONNX initializer that holds that parameter
(`onnx_name`; the export checked it is the parameter bit for bit). Writing replaces those
initializers' data and saves a new file atomically, keeping external data if the source had it.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import Tensor

from export.atomic import atomic_path
from export.errors import ParamsError
from export.flat_vector import check_params_vector, checked_layout
from export.manifest import read_manifest, refuse_export_file


def layout_for(path: Path, manifest: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The ONNX flat-parameter layout: from `manifest`, else the manifest.json beside `path`."""
    manifest = manifest if manifest is not None else read_manifest(Path(path).parent)
    return checked_layout(manifest, path, onnx=True)


def model_from_bytes(data: bytes, path: Path) -> onnx.ModelProto:
    """Parse an ONNX model with a one-line error for a corrupt or foreign file."""
    return _parsed(path, lambda: onnx.load_model_from_string(data))


def load_onnx(path: Path) -> onnx.ModelProto:
    """onnx.load (external data included) with a one-line error for a missing, corrupt or
    foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file")
    return _parsed(path, lambda: onnx.load(str(path)))


def _parsed(path: Path, parse) -> onnx.ModelProto:
    try:
        model = parse()
    except Exception as exc:  # protobuf DecodeError and friends
        raise ParamsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ParamsError(f"{path}: not an ONNX model (empty graph)")
    return model


def _initializers(model: onnx.ModelProto, layout, path) -> Dict[str, onnx.TensorProto]:
    inits = {t.name: t for t in model.graph.initializer}
    missing = [e["onnx_name"] for e in layout if e["onnx_name"] not in inits]
    if missing:
        raise ParamsError(f"{path}: initializers do not match the manifest: missing "
                              f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    bad = [f"{e['onnx_name']} {list(inits[e['onnx_name']].dims)} != {e['shape']}" for e in layout
           if list(inits[e["onnx_name"]].dims) != list(e["shape"])]
    if bad:
        raise ParamsError(f"{path}: initializers do not match the manifest: shape of "
                              + "; ".join(bad[:3]))
    return inits


def params_of_model(model: onnx.ModelProto, layout, path) -> Tensor:
    """The flat vector held by a loaded model's initializers, in layout order."""
    inits = _initializers(model, layout, path)
    parts = [numpy_helper.to_array(inits[e["onnx_name"]]).reshape(-1) for e in layout]
    return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))


def read_onnx_params(path: Path, manifest: Optional[Dict[str, Any]] = None) -> Tensor:
    """The flat parameter vector stored in an exported ONNX file (== eager `get_params()`).

    Args:
        path: an ONNX file written by the export (or by `write_onnx_params`).
        manifest: its export's manifest (default: the manifest.json beside `path`).
    """
    return params_of_model(load_onnx(path), layout_for(path, manifest), path)


def set_model_params(model: onnx.ModelProto, vector: Tensor, layout, path="model",
                     allow_nonfinite: bool = False) -> onnx.ModelProto:
    """Write `vector` into the initializers of `model` (in place), validated first."""
    check_params_vector(vector, layout, allow_nonfinite)
    inits = _initializers(model, layout, path)
    array = vector.detach().cpu().numpy()
    replacements = []
    for e in layout:
        old = inits[e["onnx_name"]]
        chunk = array[e["offset"]:e["offset"] + e["length"]].reshape(e["shape"])
        replacements.append((old, numpy_helper.from_array(chunk.astype(np.float32), old.name)))
    for old, new in replacements:  # all validated and converted: now change the model
        old.CopyFrom(new)
    return model


def write_onnx_params(path: Path, vector: Tensor, out: Path,
                      manifest: Optional[Dict[str, Any]] = None,
                      allow_nonfinite: bool = False) -> Path:
    """A copy of the ONNX file at `path` with `vector` as its parameters, written atomically."""
    path, out = Path(path), Path(out)
    model = load_onnx(path)
    layout = layout_for(path, manifest)
    if out.resolve() == path.resolve():
        raise ParamsError(f"{out}: write to a new file; overwriting an exported artifact would "
                              "break its sha256 in the manifest")
    refuse_export_file(out)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    set_model_params(model, vector, layout, path, allow_nonfinite)
    if external:
        data_name = out.name + ".data"
        refuse_export_file(out.parent / data_name)
        # the data file is renamed into place first, then the graph that refers to it
        with atomic_path(out) as tmp, atomic_path(out.parent / data_name) as tmp_data:
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=tmp_data.name)
            # the graph must name the final data file, not its temporary name
            model_ref = onnx.load(str(tmp), load_external_data=False)
            for t in model_ref.graph.initializer:
                for kv in t.external_data:
                    if kv.key == "location":
                        kv.value = data_name
            onnx.save(model_ref, str(tmp))
    else:
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
    return out


def rewrite_shared_params(directory: Path, vector: Tensor, allow_nonfinite: bool = False) -> Dict[str, Any]:
    """Put `vector` into an export directory with shared ONNX weights, in place and atomically.

    `weights.onnx.data` (read by every mode's graph) gets the new values at the offsets the
    graphs name; the TorchScript files and torch.export programs, which hold their own copy,
    get the same vector; int8 files (quantized from the old weights) and AOTInductor packages
    (weights compiled in) are removed. All of it happens in a staging copy of
    the directory that replaces it in one step, with the manifest's hashes updated.
    """
    from export.manifest import SHARED_WEIGHTS, artifact_name, check_files, file_entry, write_manifest
    from export.torchscript_export import load_torchscript, save_torchscript
    from export.transaction import DirectoryTransaction

    directory = Path(directory)
    with DirectoryTransaction(directory, keep_existing=True) as tx:
        staging = tx.staging
        manifest = read_manifest(staging)
        if manifest.get("onnx_weights") != "shared":
            raise ParamsError(f"{directory}: its ONNX files hold their own weights (exported "
                                  "without --onnx-weights shared); write a new file with --out")
        check_files(staging, manifest)
        layout = layout_for(staging, manifest)
        check_params_vector(vector, layout, allow_nonfinite)
        graph = next(staging / artifact_name(m, "onnx") for m in manifest["modes"]
                     if artifact_name(m, "onnx") in manifest["files"])
        where = {t.name: {kv.key: kv.value for kv in t.external_data}
                 for t in onnx.load(str(graph), load_external_data=False).graph.initializer
                 if t.data_location == onnx.TensorProto.EXTERNAL}
        data = bytearray((staging / SHARED_WEIGHTS).read_bytes())
        values = vector.detach().cpu().numpy().astype("<f4")
        for e in layout:
            place = where.get(e["onnx_name"])
            chunk = values[e["offset"]:e["offset"] + e["length"]].tobytes()
            if place is None or int(place.get("length", -1)) != len(chunk):
                raise ParamsError(f"{graph}: {e['onnx_name']} is not where the layout expects it "
                                      f"in {SHARED_WEIGHTS}")
            start = int(place.get("offset", 0))
            data[start:start + len(chunk)] = chunk
        with atomic_path(staging / SHARED_WEIGHTS) as tmp:
            tmp.write_bytes(bytes(data))
        manifest["files"][SHARED_WEIGHTS] = file_entry(staging / SHARED_WEIGHTS)
        for name in [n for n in manifest["files"] if n.endswith(".pt")]:
            module = load_torchscript(staging / name)
            module.set_params(vector.detach().cpu())
            with atomic_path(staging / name) as tmp:
                save_torchscript(module, tmp)
            manifest["files"][name] = file_entry(staging / name)
        for name in [n for n, info in (manifest.get("programs") or {}).items() if info["format"] == "exported"]:
            from export.program_export import load_program, program_bytes, set_program_params

            program = load_program(staging / name)
            set_program_params(program, vector.detach().cpu(), layout, name, allow_nonfinite)
            with atomic_path(staging / name) as tmp:
                tmp.write_bytes(program_bytes(program))
            manifest["files"][name] = file_entry(staging / name)
        stale = [info["file"] for info in manifest.pop("quantized", {}).values()]
        stale += [n for n, info in (manifest.get("programs") or {}).items() if info["format"] == "aoti"]
        for name in stale:
            manifest["files"].pop(name, None)
            (manifest.get("programs") or {}).pop(name, None)
            (staging / name).unlink(missing_ok=True)
        manifest["source"] = {**manifest.get("source", {}), "params_rewritten": True}
        write_manifest(staging, manifest)
        tx.commit()
    return manifest
