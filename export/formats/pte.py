"""ExecuTorch programs (`<mode>.pte`) for devices, lowered to XNNPACK (the `edge` extra).

Each mode's torch.export program, traced with a bounded dynamic batch (1..`max_batch`) at the
export's image size, goes through `to_edge_transform_and_lower(..., XnnpackPartitioner())` and
`to_executorch()`. ExecuTorch plans every activation's memory ahead for the batch's upper
bound, so the bound is part of the file (recorded in the manifest). Loadable without the zoo:
`executorch.runtime.Runtime.get().load_program(path).load_method("forward")`.

XNNPACK packs the weights it runs (BatchNorm folded into the convolutions, stored by content
hash), so the flat vector is not in them: a second method, `get_params`, returns it (a copy of
every parameter, in `parameters()` order; the file grows by the weights' size, dropped with
`--pte-without-params`). Replacing weights needs lowering again.
"""

import importlib
import time
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
from torch import Tensor

from export.errors import ExportError, ParamsError, first_line
from export.formats.base import Format, Layout, Source, quiet_logger, retrace_keeping_ranges, verify_in_fresh_process
from export.store.manifest import ARTIFACT_SUFFIX

#: what to install for this format
EXTRA = "pip install 'returnt-zoo[edge]' (executorch==1.5.1)"
#: the default upper bound of a .pte's dynamic batch (`--pte-max-batch`)
DEFAULT_MAX_BATCH = 64


def _quiet_import() -> ContextManager[None]:
    """torchao (imported by ExecuTorch) registers an Enum with torch's pytree, which logs a
    deprecation warning at import; only that logger is raised for the import."""
    return quiet_logger("torch.utils._pytree")


def executorch_version() -> str:
    """The installed ExecuTorch's version; one line naming the extra to install otherwise."""
    from importlib import metadata

    try:
        with _quiet_import():
            importlib.import_module("executorch.exir")
        return metadata.version("executorch")
    except ImportError:
        raise ExportError(f"the pte format (ExecuTorch) needs executorch: {EXTRA}") from None


#: the method that returns the flat parameter vector, and the input it takes (methods need one)
PARAMS_METHOD = "get_params"
PARAMS_INPUT = torch.zeros(1)


class _FlatParams(torch.nn.Module):
    """`get_params`: the flat vector as a constant of the program, returned as it is."""

    def __init__(self, vector: Tensor) -> None:
        super().__init__()
        self.register_buffer("flat", vector.detach().cpu().clone())

    def forward(self, unused: Tensor) -> Tensor:
        return self.flat.clone()


def lower(program: torch.export.ExportedProgram, flat_params: Optional[Tensor] = None
          ) -> "tuple[bytes, Dict[str, Any]]":
    """XNNPACK-lowered ExecuTorch program bytes (`forward`, and `get_params` returning
    `flat_params` when given), and what the manifest records of them."""
    version = executorch_version()
    with _quiet_import():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    ops = _count_ops(program.graph_module)
    start = time.perf_counter()
    methods: Dict[str, torch.export.ExportedProgram] = {"forward": program}
    if flat_params is not None:
        methods[PARAMS_METHOD] = torch.export.export(_FlatParams(flat_params), (PARAMS_INPUT,), strict=False)
    with retrace_keeping_ranges(program):
        edge = to_edge_transform_and_lower(methods, partitioner=[XnnpackPartitioner()])
        remaining = _count_ops(edge.exported_program("forward").graph_module)
        executorch_program = edge.to_executorch()
    plan = next(p for p in executorch_program.executorch_program.execution_plan if p.name == "forward")
    info = {"seconds": round(time.perf_counter() - start, 2), "executorch": version, "backend": "XnnpackBackend",
            "delegated_ops_pct": round(100.0 * (1 - remaining / ops), 1) if ops else 0.0,
            "planned_bytes": int(sum(plan.non_const_buffer_sizes)), "flat_params": flat_params is not None}
    return bytes(executorch_program.buffer), info


def lower_int8(program: torch.export.ExportedProgram, calibration: Tensor, max_batch: int,
               batch: int = 8) -> "tuple[bytes, Dict[str, Any]]":
    """The program quantized for XNNPACK (PT2E with ExecuTorch's XNNPACKQuantizer: symmetric
    int8, per-channel weights, activation ranges observed on `calibration`), traced again with
    the batch bounded by `max_batch`, and lowered like fp32."""
    executorch_version()
    with _quiet_import():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    start = time.perf_counter()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    observed = prepare_pt2e(program.module(), quantizer)
    batch = min(batch, max_batch)  # the program's module checks its inputs against the bound
    with torch.no_grad():
        for i in range(0, len(calibration), batch):
            observed(calibration[i:i + batch])
    quantized = convert_pt2e(observed)
    example = calibration[:2] if len(calibration) >= 2 else calibration.repeat(2, *[1] * (calibration.dim() - 1))
    dims = {"x": {0: torch.export.Dim("batch", min=1, max=max_batch)}} if max_batch > 1 else None
    traced = torch.export.export(quantized, (example[:1] if max_batch == 1 else example,), dynamic_shapes=dims,
                                 strict=False)
    data, info = lower(traced)
    info.update(seconds=round(time.perf_counter() - start, 2), precision="int8",
                calibration_samples=int(len(calibration)))
    return data, info


def _count_ops(graph_module: torch.fx.GraphModule) -> int:
    """Operator calls of a graph (delegate calls and tuple unpacking excluded)."""
    skip = ("executorch_call_delegate", "getitem")
    return sum(1 for n in graph_module.graph.nodes
               if n.op == "call_function" and not any(s in str(n.target) for s in skip))


class LoadedProgram:
    """A loaded program's `forward` method, holding the program (and its bytes) it runs from:
    a method whose program is freed crashes the process."""

    def __init__(self, data: bytes, program: Any) -> None:
        self.data, self.program = data, program
        self.method = program.load_method("forward")

    def execute(self, inputs: List[Tensor]) -> List[Tensor]:
        return self.method.execute(inputs)

    def flat_params(self, where: str) -> Tensor:
        """The vector `get_params` returns; one line for a program lowered without it."""
        if PARAMS_METHOD not in self.program.method_names:
            raise ParamsError(f"{where}: lowered without the {PARAMS_METHOD} method (--pte-without-params), "
                              "and XNNPACK's packed weights are not the flat vector; read it from the same "
                              "export's <mode>.ep.pt2 or <mode>.onnx")
        return self.program.load_method(PARAMS_METHOD).execute([PARAMS_INPUT])[0].clone()


def load_method(source: Source) -> LoadedProgram:
    """`Runtime.get().load_program(...).load_method("forward")` of a path or of bytes already
    checked against the manifest."""
    executorch_version()
    with _quiet_import():
        from executorch.runtime import Runtime
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        return LoadedProgram(data, Runtime.get().load_program(data))
    except Exception as exc:  # the runtime raises RuntimeError/ValueError for a bad file
        where = "the given bytes" if isinstance(source, bytes) else str(source)
        raise ExportError(f"{where}: not a loadable ExecuTorch program ({type(exc).__name__}: "
                          f"{first_line(exc, 120)})") from None


def _write(program: torch.export.ExportedProgram, path: Path, max_batch: int = DEFAULT_MAX_BATCH,
           flat_params: Optional[Tensor] = None) -> Optional[Dict[str, Any]]:
    data, info = lower(program, flat_params)
    Path(path).write_bytes(data)
    return {**info, "max_batch": max_batch, "weights_replaceable": False}


def _load(source: Source, device: str = "cpu") -> Callable[[Tensor], Any]:
    method = load_method(source)
    return lambda x: method.execute([x.detach().cpu().contiguous()])


def _read_params(path: Path, layout: Layout) -> Tensor:
    vector = load_method(path).flat_params(str(path))
    expected = sum(e.length for e in layout)
    if vector.dim() != 1 or vector.numel() != expected:
        raise ParamsError(f"{path}: its {PARAMS_METHOD} returns {tuple(vector.shape)}, the manifest's layout has "
                          f"{expected} parameters")
    return vector


def _write_params(path: Path, vector: Tensor, out: Path, layout: Layout, allow_nonfinite: bool = False) -> Path:
    raise ParamsError(f"{path}: ExecuTorch bakes the weights into the lowered XNNPACK program; new "
                      "weights need lowering again: python -m export BACKBONE --checkpoint CKPT "
                      "--formats pte")


FORMAT = Format("pte", ARTIFACT_SUFFIX["pte"], _write, _load, _read_params, _write_params)


_FRESH = """
from executorch.runtime import Runtime
runtime = Runtime.get()


def run(job, shared):
    path, inputs = job
    program = runtime.load_program(path)
    method = program.load_method("forward")
    return [list(method.execute([x])) for x in inputs]
"""


def verify_fresh(jobs: List[tuple]) -> List[Dict[str, dict]]:
    """Verify .pte files with ExecuTorch's runtime in a fresh Python (`-I`: no zoo, nothing of
    the process that lowered them): jobs of (path, output names, inputs, expected), one child."""
    return verify_in_fresh_process(
        _FRESH, [(str(path), [x.cpu().contiguous() for x in inputs]) for path, _, inputs, _ in jobs], jobs)
