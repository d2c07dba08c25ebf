"""torch.export programs: `<mode>.ep.pt2`, the input of AOTInductor, ExecuTorch and the ONNX
exporter, loadable without the zoo (`torch.export.load(path).module()`).

One `torch.export.export` per mode of the fixed head, with a dynamic batch dimension (and
dynamic H and W where the backbone takes any size). The `'full'` program is also what the ONNX
exporter translates, so exporting both formats traces the network once per mode, not twice.
"""

import copy
import io
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from export.errors import ParamsError
from export.flat_vector import check_params_vector
from zoo.base import MammothBackbone
from zoo.heads import BACKBONE_PREFIX, make_head

#: the largest batch a dynamic-batch program accepts (its range is recorded in the manifest)
MAX_BATCH = 4096
#: the batch of the example input a program is traced with (verification uses other sizes)
EXAMPLE_BATCH = 2


def dynamic_shapes(net: MammothBackbone, batch: Optional[int] = None) -> Dict[str, Dict[int, Any]]:
    """The input's dynamic dimensions: batch (unless `batch` fixes it) and, for backbones that
    take any H and W, height and width (Dim.AUTO: kept dynamic only where the graph allows)."""
    dims: Dict[int, Any] = {} if batch is not None else {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    if getattr(net, "dynamic_hw", False):
        dims[2] = torch.export.Dim.AUTO
        dims[3] = torch.export.Dim.AUTO
    return {"x": dims}


def dynamic_dims(net: MammothBackbone, batch: Optional[int] = None) -> List[str]:
    """Names of the input dimensions a program of `net` leaves free (for the manifest)."""
    names = [] if batch is not None else ["batch"]
    return names + (["height", "width"] if getattr(net, "dynamic_hw", False) else [])


def export_program(net: MammothBackbone, mode: str, input_shape: Tuple[int, ...], device: str = "cpu",
                   preprocess: Optional[torch.nn.Module] = None,
                   batch: Optional[int] = None) -> torch.export.ExportedProgram:
    """`torch.export.export` of `mode`'s head (eval). With `batch`, that batch size is fixed
    (what AOTInductor compiles fastest code for); otherwise it is dynamic, 1..MAX_BATCH."""
    head = make_head(net, mode, preprocess)
    # seeded: the program file stores its example input, and exports are byte-reproducible
    example = torch.randn(batch or EXAMPLE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from inside torch.export
        return torch.export.export(head, (example,), dynamic_shapes=dynamic_shapes(net, batch),
                                   strict=False)


def derive_program(full: torch.export.ExportedProgram, mode: str,
                   output_names: Sequence[str]) -> torch.export.ExportedProgram:
    """`mode`'s program from the `'full'` head's: the same graph returning fewer outputs (in
    `mode`'s structure: a tensor, a tuple of two, or the list), dead nodes removed. The same
    program `torch.export` would trace for `mode`'s head, without tracing the network again."""
    from torch.export.graph_signature import OutputKind
    from torch.utils import _pytree as pytree

    from zoo.base import mode_outputs

    if mode == "full":
        return full
    picks = [list(output_names).index(n) for n in mode_outputs(list(output_names))[mode]]
    program = copy.deepcopy(full)
    graph = program.graph_module.graph
    output = next(n for n in graph.nodes if n.op == "output")
    values = list(output.args[0])
    specs = program.graph_signature.output_specs
    if len(values) != len(output_names) or any(s.kind != OutputKind.USER_OUTPUT for s in specs):
        raise RuntimeError(f"the 'full' program has {len(values)} outputs, expected the {len(output_names)} user "
                           "outputs only; derive the mode's program by exporting its head instead")
    output.args = (tuple(values[i] for i in picks),)
    specs[:] = [specs[i] for i in picks]
    graph.eliminate_dead_code()
    program.graph_module.recompile()
    example = torch.empty(0)
    structure = (example, example) if mode == "both" else example
    program._module_call_graph[0].signature.out_spec = pytree.tree_flatten(structure)[1]
    return program


def program_bytes(program: torch.export.ExportedProgram) -> bytes:
    """`torch.export.save` into memory: byte-reproducible, without the stack traces of the
    tracing (they name the build machine's source paths; the graph does not need them)."""
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                node.meta.pop("stack_trace", None)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def load_program(source: Union[Path, bytes]) -> torch.export.ExportedProgram:
    """`torch.export.load` of a path or of bytes already checked against the manifest, with a
    one-line error for a file that is not a saved program."""
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # zipfile, pickle and schema errors alike
        where = "the given bytes" if isinstance(source, bytes) else str(source)
        raise ParamsError(f"{where}: not a torch.export program ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None


def layout_names(entry: Dict[str, Any]) -> List[str]:
    """The names a layout entry's parameter has in programs and packages."""
    return list(entry.get("program_names") or [BACKBONE_PREFIX + entry["name"]])


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


def _state(program: torch.export.ExportedProgram, layout, path) -> Dict[str, List[Tensor]]:
    """Every tensor of each layout parameter in the program (the one its graph reads first),
    checked against the layout."""
    state = program.state_dict
    used = used_parameters(program)
    expected = ", ".join(f"{e['name']}{e['shape']}" for e in layout[:4]) + (" ..." if len(layout) > 4 else "")
    found: Dict[str, List[Tensor]] = {}
    for e in layout:
        names = sorted((n for n in layout_names(e) if n in state), key=lambda n: n not in used)
        if not names:
            raise ParamsError(f"{path}: its parameters do not match the manifest's layout (missing "
                              f"{e['name']}); expected {expected}")
        tensors = [state[n] for n in names]
        if any(list(t.shape) != list(e["shape"]) for t in tensors):
            raise ParamsError(f"{path}: its parameters do not match the manifest's layout (shape of "
                              f"{e['name']} {list(tensors[0].shape)} != {e['shape']}); expected {expected}")
        found[e["name"]] = tensors
    return found


def program_params(program: torch.export.ExportedProgram, layout, path="program") -> Tensor:
    """The flat vector a program holds, in the layout's (= eager `parameters()`) order."""
    state = _state(program, layout, path)
    return torch.cat([state[e["name"]][0].detach().reshape(-1).cpu() for e in layout])


def set_program_params(program: torch.export.ExportedProgram, vector: Tensor, layout,
                       path="program", allow_nonfinite: bool = False) -> None:
    """Write `vector` into the program's parameters (every name each one has) in place,
    checked first; modules made with `program.module()` afterwards use it."""
    check_params_vector(vector, layout, allow_nonfinite)
    state = _state(program, layout, path)
    with torch.no_grad():
        for e in layout:
            for t in state[e["name"]]:
                t.copy_(vector[e["offset"]:e["offset"] + e["length"]].view(t.shape).to(t.device))


def write_program_params(path: Path, vector: Tensor, out: Path, layout,
                         allow_nonfinite: bool = False) -> Path:
    """A copy of the program at `path` with `vector` as its parameters, written atomically."""
    from export.atomic import atomic_path
    from export.manifest import refuse_export_file

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
