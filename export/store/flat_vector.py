"""The flat parameter vector's layout (name, shape, offset, length per parameter, in eager
`parameters()` order) and the checks every format's `set_params`/`params write` shares."""

from typing import Dict, List, Mapping, Optional

import torch
from torch import Tensor

from export.errors import ParamsError
from export.store.manifest import LayoutEntry, Manifest, layout_problem
from zoo.base import check_flat_vector
from zoo.heads import BACKBONE_PREFIX


def check_params_vector(vector: Tensor, layout, allow_nonfinite: bool = False) -> None:
    """A 1-D float32 vector of the layout's length, finite unless `allow_nonfinite`."""
    total = sum(e.length for e in layout)
    try:
        check_flat_vector(vector, total, torch.float32, "set_params")
    except ValueError as exc:
        raise ParamsError(str(exc)) from None
    if not allow_nonfinite and not bool(torch.isfinite(vector).all()):
        bad = int((~torch.isfinite(vector)).sum())
        raise ParamsError(f"set_params: vector has {bad} NaN/inf values; pass allow_nonfinite=True "
                          "(--allow-nonfinite) to write them anyway")


def checked_layout(manifest: Manifest, where: object, onnx: bool = False) -> List[LayoutEntry]:
    """The manifest's flat-parameter layout, checked to tile the vector (and, with `onnx`, to
    name each parameter's ONNX initializer)."""
    layout = manifest.flat_params.layout
    if not layout:
        raise ParamsError(f"{where}: the manifest has no flat-parameter layout")
    if onnx and any(e.onnx_name is None for e in layout):
        raise ParamsError(f"{where}: the manifest has no ONNX parameter layout "
                          "(export with --formats including onnx)")
    problem = layout_problem(layout, manifest.flat_params.count)
    if problem:
        raise ParamsError(f"{where}: the manifest's parameter layout is inconsistent: {problem}")
    return layout


def layout_names(entry: LayoutEntry) -> List[str]:
    """The names a layout entry's parameter has in torch.export programs and AOTInductor packages."""
    return list(entry.program_names or [BACKBONE_PREFIX + entry.name])


#: eager buffer name -> value: the running statistics (BatchNorm's running_mean/var) and other
#: floating buffers a version carries beside the flat parameter vector
Buffers = Mapping[str, Tensor]


def prefixed_buffers(buffers: Optional[Buffers]) -> Dict[str, Tensor]:
    """The buffers under the names every format gives them (the head's `backbone.` prefix:
    TorchScript attributes, program state, ONNX initializers, package constants)."""
    return {BACKBONE_PREFIX + name: value.detach().cpu() for name, value in (buffers or {}).items()}


def check_buffers(buffers: Optional[Buffers], allow_nonfinite: bool = False) -> None:
    """Floating tensors, finite unless `allow_nonfinite`; one line naming the first bad one."""
    for name, value in (buffers or {}).items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise ParamsError(f"buffer {name}: expected a floating-point tensor, got "
                              f"{getattr(value, 'dtype', type(value).__name__)}")
        if not allow_nonfinite and not bool(torch.isfinite(value).all()):
            raise ParamsError(f"buffer {name}: has NaN/inf values")
