"""`manifest.json`: what was exported, from what, how well it matches eager (SPEC §4)."""

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List

import torch

from export.atomic import atomic_write_bytes
from zoo.base import MammothBackbone

MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> Dict[str, Any]:
    return {"sha256": sha256(path), "size": path.stat().st_size}


def versions() -> Dict[str, str]:
    import onnx
    import onnxruntime
    import onnxscript

    import zoo

    return {"torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "onnxscript": onnxscript.__version__,
            "returnt_zoo": zoo.__version__}


def param_layout(net: MammothBackbone, onnx_names: Dict[str, str]) -> List[Dict[str, Any]]:
    """name, shape, offset, length in eager parameters() order (+ the ONNX initializer name)."""
    layout, offset = [], 0
    for name, p in net.named_parameters():
        entry = {"name": name, "shape": list(p.shape), "offset": offset, "length": p.numel()}
        if name in onnx_names:
            entry["onnx_name"] = onnx_names[name]
        layout.append(entry)
        offset += p.numel()
    return layout


def write_manifest(directory: Path, manifest: Dict[str, Any]) -> Path:
    path = Path(directory) / MANIFEST
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


def read_manifest(directory: Path) -> Dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST} (not an export directory?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
