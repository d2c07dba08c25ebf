"""torch.export programs (`<mode>.ep.pt2`), loadable without the zoo
(`torch.export.load(path).module()`): the program each mode's head traces to (the pipeline
traces them, `export.pipeline.trace`), saved byte-reproducibly; their flat parameters are the
program's state.
"""

import copy
import hashlib
import io
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from export.errors import ParamsError, first_line
from export.formats.base import Format, Layout, Source, used_parameters
from export.formats.program_serde import memoised_serde
from export.store.atomic import atomic_path
from export.store.flat_vector import Buffers, check_params_vector, layout_names, prefixed_buffers
from export.store.manifest import ARTIFACT_SUFFIX, refuse_export_file


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """`torch.export.save` into memory: byte-reproducible, without the stack traces of the
    tracing (they name the build machine's source paths; the graph does not need them)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    with memoised_serde():
        torch.export.save(program, buffer)
    return buffer.getvalue()


#: the most file bytes of programs kept deserialised for `load_program` (least recently used
#: dropped first); a larger program is never kept
PROGRAM_CACHE_BYTES = 256 << 20


class _ProgramCache:
    """Programs this process has deserialised, by the sha256 of their bytes. torch.export.load
    parses every symbolic size with sympy: 0.2-1 s per program of a CNN whose height and width
    are dynamic even with the parses memoised (program_serde), where a deep copy takes ~0.02 s
    and saves to the same bytes. The same bytes come back often: a program verified after
    writing and then loaded, each version published into a directory (its program files stay;
    the new weights are set after loading), each engine's load of a mode."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: "OrderedDict[str, Tuple[int, torch.export.ExportedProgram]]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, data: bytes, load: Callable[[bytes], torch.export.ExportedProgram]) -> torch.export.ExportedProgram:
        """A private copy of the program `data` holds (`load(data)` the first time)."""
        if len(data) > self.limit:
            return load(data)
        key = hashlib.sha256(data).hexdigest()
        with self._lock:
            held = self._held.get(key)
            if held is not None:
                self._held.move_to_end(key)
        if held is None:
            program = load(data)
            with self._lock:
                self._held[key] = (len(data), program)
                while sum(size for size, _ in self._held.values()) > self.limit:
                    self._held.popitem(last=False)
            held = (len(data), program)
        return copy.deepcopy(held[1])


_CACHE = _ProgramCache(PROGRAM_CACHE_BYTES)


def load_program(source: Union[Path, bytes]) -> torch.export.ExportedProgram:
    """`torch.export.load` of a path or of bytes already checked against the manifest (a private
    copy: bytes this process deserialised before are not parsed again), with a one-line error
    for a file that is not a saved program."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()

    def deserialise(data: bytes) -> torch.export.ExportedProgram:
        try:
            with warnings.catch_warnings(), memoised_serde():
                warnings.simplefilter("ignore")
                return torch.export.load(io.BytesIO(data))
        except Exception as exc:  # zipfile, pickle and schema errors alike
            where = "the given bytes" if isinstance(source, bytes) else str(source)
            raise ParamsError(f"{where}: not a torch.export program ({type(exc).__name__}: "
                              f"{first_line(exc, 100)})") from None

    return _CACHE.get(data, deserialise)


def _state(program: torch.export.ExportedProgram, layout, path) -> Dict[str, List[Tensor]]:
    """Every tensor of each layout parameter in the program (the one its graph reads first),
    checked against the layout."""
    state = program.state_dict
    used = used_parameters(program)
    expected = ", ".join(f"{e.name}{e.shape}" for e in layout[:4]) + (" ..." if len(layout) > 4 else "")
    found: Dict[str, List[Tensor]] = {}
    for e in layout:
        names = sorted((n for n in layout_names(e) if n in state), key=lambda n: n not in used)
        if not names:
            raise ParamsError(f"{path}: its parameters do not match the manifest's layout (missing "
                              f"{e.name}); expected {expected}")
        tensors = [state[n] for n in names]
        if any(list(t.shape) != list(e.shape) for t in tensors):
            raise ParamsError(f"{path}: its parameters do not match the manifest's layout (shape of "
                              f"{e.name} {list(tensors[0].shape)} != {e.shape}); expected {expected}")
        found[e.name] = tensors
    return found


def program_params(program: torch.export.ExportedProgram, layout, path="program") -> Tensor:
    """The flat vector a program holds, in the layout's (= eager `parameters()`) order."""
    state = _state(program, layout, path)
    return torch.cat([state[e.name][0].detach().reshape(-1).cpu() for e in layout])


def set_program_params(program: torch.export.ExportedProgram, vector: Tensor, layout,
                       path="program", allow_nonfinite: bool = False, buffers: Optional[Buffers] = None) -> None:
    """Write `vector` into the program's parameters (every name each one has) in place,
    checked first, and `buffers` (eager names) into the buffers it holds; modules made with
    `program.module()` afterwards use them."""
    check_params_vector(vector, layout, allow_nonfinite)
    state = _state(program, layout, path)
    held = {**program.constants, **program.state_dict}
    with torch.no_grad():
        for e in layout:
            for t in state[e.name]:
                t.copy_(vector[e.offset:e.offset + e.length].view(t.shape).to(t.device))
        for name, value in prefixed_buffers(buffers).items():
            target = held.get(name)
            if isinstance(target, Tensor) and target.is_floating_point():
                target.copy_(value.reshape(target.shape).to(target.device))


def write_program_params(path: Path, vector: Tensor, out: Path, layout,
                         allow_nonfinite: bool = False) -> Path:
    """A copy of the program at `path` with `vector` as its parameters, written atomically."""
    path, out = Path(path), Path(out)
    if out.resolve() == path.resolve():
        raise ParamsError(f"{out}: write to a new file; overwriting an exported artifact would "
                          "break its sha256 in the manifest")
    refuse_export_file(out)
    program = load_program(path)
    set_program_params(program, vector, layout, path, allow_nonfinite)
    with atomic_path(out) as tmp:
        tmp.write_bytes(program_bytes(program))
    return out


def _write(program: torch.export.ExportedProgram, path: Path) -> Optional[Dict[str, Any]]:
    Path(path).write_bytes(program_bytes(program))
    return None


def _load(source: Source, device: str = "cpu") -> Callable[[Tensor], Any]:
    """A program as users load it: `torch.export.load(path).module()`."""
    module = load_program(source).module()
    return lambda x: module(x.to(device))


def _read_params(path: Path, layout: Layout) -> Tensor:
    return program_params(load_program(path), layout, path)


FORMAT = Format("exported", ARTIFACT_SUFFIX["exported"], _write, _load, _read_params, write_program_params)
