"""`manifest.json`: what was exported, from what, how well it matches eager, and the sha256 of
every file, which every loader checks before it trusts a file."""

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from export.errors import ExportError, IntegrityError, ManifestError, ParamsError
from export.store.atomic import atomic_write_bytes

MANIFEST = "manifest.json"
#: the one external-data file every mode's ONNX graph reads its parameters from (--onnx-weights shared)
SHARED_WEIGHTS = "weights.onnx.data"
#: file name of each kind of artifact, after the mode: `out.pt`, `full.onnx`, `out.int8.onnx`
ARTIFACT_SUFFIX = {"torchscript": ".pt", "onnx": ".onnx", "int8": ".int8.onnx", "exported": ".ep.pt2",
                   "aoti": ".aoti.pt2"}


def artifact_name(mode: str, kind: str) -> str:
    """The file name of `mode`'s artifact of `kind` (torchscript, onnx, int8, exported, aoti)."""
    return mode + ARTIFACT_SUFFIX[kind]


def aoti_name(mode: str, batch: Optional[int]) -> str:
    """`out.aoti.pt2` (any batch size) or `out.aoti.b64.pt2` (compiled for batch 64 only)."""
    return artifact_name(mode, "aoti") if batch is None else f"{mode}.aoti.b{batch}.pt2"

#: the float32 formats, in the order every listing uses
FLOAT_FORMATS = ("torchscript", "onnx", "exported", "aoti")


def aoti_packages(manifest: Dict[str, Any], mode: str) -> Dict[Optional[int], str]:
    """batch (None: any batch) -> file name of every listed AOTInductor package of `mode`."""
    return {info.get("batch"): name for name, info in sorted((manifest.get("programs") or {}).items())
            if info.get("format") == "aoti" and info.get("mode") == mode and name in manifest["files"]}


def mode_files(manifest: Dict[str, Any], fmt: str) -> Dict[str, str]:
    """mode -> file name of every listed file of format `fmt` (torchscript, onnx, int8, exported;
    for aoti: the any-batch package, else the first per-batch one), in RETURNT_MODES order."""
    from zoo.base import RETURNT_MODES

    found = {}
    for mode in RETURNT_MODES:
        if mode not in manifest["modes"]:
            continue
        if fmt == "aoti":
            packages = aoti_packages(manifest, mode)
            name = packages.get(None) or next(iter(packages.values()), None)
        else:
            name = artifact_name(mode, fmt) if artifact_name(mode, fmt) in manifest["files"] else None
        if name:
            found[mode] = name
    return found


def modes_with(manifest: Dict[str, Any], fmt: str) -> List[str]:
    """The modes that have files of format `fmt`, in RETURNT_MODES order."""
    return list(mode_files(manifest, fmt))


def artifacts(manifest: Dict[str, Any]) -> List[tuple]:
    """(mode, format, file name, batch) of every listed artifact of the float32 formats; batch is
    None except for an AOTInductor package compiled for one batch size."""
    found = []
    for mode in manifest["modes"]:
        for fmt in FLOAT_FORMATS[:-1]:
            if artifact_name(mode, fmt) in manifest["files"]:
                found.append((mode, fmt, artifact_name(mode, fmt), None))
        found += [(mode, "aoti", name, batch) for batch, name in aoti_packages(manifest, mode).items()]
    return found


def output_names(manifest: Dict[str, Any], mode: str) -> List[str]:
    """The output names of `mode`, in its returned order."""
    return [o["name"] for o in manifest["modes"][mode]["outputs"]]


#: top-level keys every manifest this tool writes has, with their JSON types
REQUIRED_KEYS = {"backbone": dict, "input": dict, "modes": dict, "files": dict,
                 "flat_params": dict}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def free_dims(shape: List[Any]) -> List[int]:
    """A manifest shape with its named (dynamic) dimensions as -1."""
    return [d if isinstance(d, int) else -1 for d in shape]


def input_dims(manifest: Dict[str, Any]) -> List[int]:
    """The input's shape with -1 for each dynamic dimension (batch; height and width where the
    export takes any image size), as serving protocols and model configs write it."""
    spec = manifest["input"]
    dims = free_dims(spec["shape"])
    dynamic = spec.get("dynamic", [])
    for name, index in (("batch", 0), ("height", -2), ("width", -1)):
        if name in dynamic:
            dims[index] = -1
    return dims


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> Dict[str, Any]:
    return {"sha256": sha256(path), "size": path.stat().st_size}


def layout_problem(layout: List[Dict[str, Any]], count: Optional[int] = None) -> str:
    """'' when the layout tiles the flat vector exactly (contiguous, in order, lengths equal to
    the shapes' products, total == count), else the first problem in one line."""
    offset = 0
    for e in layout:
        if not isinstance(e, dict) or not {"name", "shape", "offset", "length"} <= set(e):
            return f"layout entry {e!r} lacks name/shape/offset/length"
        if e["offset"] != offset:
            return f"{e['name']}: offset {e['offset']}, expected {offset}"
        if e["length"] != math.prod(e["shape"]):
            return f"{e['name']}: length {e['length']} != product of shape {e['shape']}"
        offset += e["length"]
    if count is not None and offset != count:
        return f"layout covers {offset} parameters, the manifest's count is {count}"
    return ""


def _finite(value: Any) -> Any:
    """JSON has no NaN/Infinity: non-finite floats are written as strings ('nan', 'inf')."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def manifest_bytes(manifest: Dict[str, Any]) -> bytes:
    return (json.dumps(_finite(manifest), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def write_manifest(directory: Path, manifest: Dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    atomic_write_bytes(path, manifest_bytes(manifest))
    return path


def read_manifest(directory: Path) -> Dict[str, Any]:
    """The manifest of an export directory, checked for the shape this tool writes."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST} (not an export directory?)")
    try:
        manifest = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(manifest).__name__}")
    for key, kind in REQUIRED_KEYS.items():
        if not isinstance(manifest.get(key), kind):
            raise ManifestError(f"{path}: no {key!r} {kind.__name__} (not written by this tool, "
                                "or damaged)")
    for name, entry in manifest["files"].items():
        if ("/" in name or name.startswith(".") or not isinstance(entry, dict)
                or not _SHA256.fullmatch(str(entry.get("sha256", "")))
                or not isinstance(entry.get("size"), int)):
            raise ManifestError(f"{path}: bad files entry {name!r} (expected a plain file name "
                                "with sha256 and size)")
    return manifest


def check_file(directory: Path, manifest: Dict[str, Any], name: str) -> None:
    """One listed file exists with its recorded size and sha256."""
    entry = manifest["files"].get(name)
    path = Path(directory) / name
    if entry is None:
        raise IntegrityError(f"{path}: not listed in {MANIFEST}")
    if not path.is_file():
        raise IntegrityError(f"{path}: listed in {MANIFEST} but missing")
    if path.stat().st_size != entry["size"] or sha256(path) != entry["sha256"]:
        raise IntegrityError(f"{path}: sha256 does not match {MANIFEST} (the file was changed, "
                             "is corrupt, or comes from another export)")


def check_files(directory: Path, manifest: Dict[str, Any],
                names: Optional[Iterable[str]] = None) -> None:
    """Every file in `names` (default: every listed file) is the one the manifest describes."""
    for name in sorted(manifest["files"] if names is None else names):
        check_file(directory, manifest, name)


def read_verified(directory: Path, manifest: Dict[str, Any], name: str) -> bytes:
    """A listed file's bytes, hashed as read: what is used is what was checked."""
    entry = manifest["files"].get(name)
    path = Path(directory) / name
    if entry is None:
        raise IntegrityError(f"{path}: not listed in {MANIFEST}")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"{path}: listed in {MANIFEST} but missing") from None
    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
        raise IntegrityError(f"{path}: sha256 does not match {MANIFEST} (the file was changed, "
                             "is corrupt, or comes from another export)")
    return data


def stray_files(directory: Path, manifest: Dict[str, Any]) -> List[str]:
    """Files in the directory that the manifest does not list (temp files of a killed run,
    artifacts of an earlier export)."""
    listed = set(manifest["files"]) | {MANIFEST}
    return sorted(p.name for p in Path(directory).iterdir() if p.name not in listed)


def refuse_export_file(out: Path) -> None:
    """Refuse to write over a file of an export directory (a listed artifact or the manifest):
    it would no longer match the manifest's sha256. New names beside them are fine."""
    out = Path(os.path.abspath(out))
    manifest_path = out.parent / MANIFEST
    if not manifest_path.is_file():
        return
    if out.name == MANIFEST:
        raise ParamsError(f"{out}: refusing to overwrite an export's {MANIFEST}; write to "
                          "a new file outside the export directory")
    try:
        listed = read_manifest(out.parent)["files"]
    except ExportError:
        listed = {}
    if out.name in listed:
        raise ParamsError(f"{out}: refusing to overwrite an exported artifact (its sha256 is "
                          f"in {MANIFEST}); write to a new file")
