"""The export formats: one module each, behind `export.formats.base.Format`.

Modules load on first use (`get_format`): ONNX's and inductor's imports cost seconds, and a
command that needs one format should not pay for the others.
"""

import importlib
from pathlib import Path
from typing import Dict, Tuple

from export.errors import ExportError
from export.formats.base import Format
from export.store.manifest import ARTIFACT_SUFFIX

#: format name -> its module; the registry of formats
MODULES: Dict[str, str] = {
    "torchscript": "export.formats.torchscript",
    "onnx": "export.formats.onnx",
    "exported": "export.formats.program",
    "pte": "export.formats.pte",
    "aoti": "export.formats.aoti",
}
#: every format; `aoti` compiles C++ for tens of seconds per package and `pte` needs ExecuTorch
#: (the `edge` extra), so they are asked for explicitly
FORMATS: Tuple[str, ...] = tuple(MODULES)
DEFAULT_FORMATS: Tuple[str, ...] = ("torchscript", "onnx", "exported")


def get_format(name: str) -> Format:
    """The `Format` of `name` (one of FORMATS)."""
    if name not in MODULES:
        raise ExportError(f"unknown format {name!r}; allowed: {', '.join(FORMATS)}")
    return importlib.import_module(MODULES[name]).FORMAT


def format_of_file(path: Path) -> str:
    """The format of an exported file, from its name (`out.onnx`, `full.ep.pt2`,
    `out.aoti.b1.pt2`, `out.pte`); int8 files are onnx files quantized."""
    name = Path(path).name
    if ".aoti." in name and name.endswith(ARTIFACT_SUFFIX["aoti"][len(".aoti"):]):
        return "aoti"
    for fmt in ("exported", "pte", "onnx", "torchscript"):
        if name.endswith(ARTIFACT_SUFFIX[fmt]):
            return fmt
    raise ExportError(f"{path}: not an exported file; expected a name ending in "
                      + ", ".join(ARTIFACT_SUFFIX[f] for f in FORMATS))
