"""The one interface every format module implements, and what the torch.export-based formats
(programs and AOTInductor packages) share.

A format is a `Format` value named `FORMAT` in its own module (`export.formats.<module>`),
listed once in `export.formats.MODULES`: adding a format (ExecuTorch, TensorRT) is one module
and one line there. A format module never imports another format module.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from export.store.manifest import LayoutEntry

#: a file's path, or its bytes already checked against the manifest
Source = Union[Path, bytes]
Layout = List[LayoutEntry]


@dataclass(frozen=True)
class Format:
    """name, file suffix and the five operations of one format.

    write(artifact, path, **options): write what the pipeline hands this format (a head module,
        an ONNX model, a torch.export program) to `path`; returns what the manifest records
        of the file (or None).
    load(source, device): the file as a callable on torch tensors (outputs in the mode's order).
    read_params(path, layout): the flat vector the file holds, in the layout's order.
    write_params(path, vector, out, layout, allow_nonfinite): a copy of the file at `out`
        holding `vector` (or a one-line ExportError where the format cannot be rewritten).
    """

    name: str
    suffix: str
    write: Callable[..., Optional[Dict[str, Any]]]
    load: Callable[[Source, str], Callable[[Tensor], Any]]
    read_params: Callable[[Path, Layout], Tensor]
    write_params: Callable[[Path, Tensor, Path, Layout, bool], Path]


def used_parameters(program: torch.export.ExportedProgram) -> set:
    """state_dict names of the parameters the program's outputs depend on (a 'features' head
    still traces the classifier, whose result it drops; compilers remove that)."""
    params = program.graph_signature.inputs_to_parameters
    output = next(n for n in program.graph.nodes if n.op == "output")
    seen, stack = set(), [output]
    while stack:
        node = stack.pop()
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return {params[n.name] for n in seen if n.op == "placeholder" and n.name in params}
