"""Tracing: one `torch.export.export` of the `'full'` head, every other mode's program derived
from it (the same graph returning fewer outputs), so every format is written from one trace.

Programs have a dynamic batch dimension (and dynamic H and W where the backbone takes any
size); a program for one fixed batch size is what AOTInductor compiles fastest code for.
"""

import copy
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from zoo.base import MammothBackbone, mode_outputs
from zoo.heads import make_head

#: the largest batch a dynamic-batch program accepts (its range is recorded in the manifest)
MAX_BATCH = 4096
#: the batch of the example input a program is traced with (verification uses other sizes)
EXAMPLE_BATCH = 2


def dynamic_shapes(net: MammothBackbone, batch: Optional[int] = None, max_batch: int = MAX_BATCH,
                   fixed_hw: bool = False) -> Dict[str, Dict[int, Any]]:
    """The input's dynamic dimensions: batch (unless `batch` fixes it; at most `max_batch`) and,
    for backbones that take any H and W (unless `fixed_hw`), height and width (Dim.AUTO: kept
    dynamic only where the graph allows)."""
    dims: Dict[int, Any] = {} if batch is not None else {0: torch.export.Dim("batch", min=1, max=max_batch)}
    if getattr(net, "dynamic_hw", False) and not fixed_hw:
        dims[2] = torch.export.Dim.AUTO
        dims[3] = torch.export.Dim.AUTO
    return {"x": dims}


def dynamic_dims(net: MammothBackbone, batch: Optional[int] = None, fixed_hw: bool = False) -> List[str]:
    """Names of the input dimensions a program of `net` leaves free (for the manifest)."""
    names = [] if batch is not None else ["batch"]
    return names + (["height", "width"] if getattr(net, "dynamic_hw", False) and not fixed_hw else [])


def export_program(net: MammothBackbone, mode: str, input_shape: Tuple[int, ...], device: str = "cpu",
                   preprocess: Optional[torch.nn.Module] = None,
                   batch: Optional[int] = None, max_batch: int = MAX_BATCH,
                   fixed_hw: bool = False) -> torch.export.ExportedProgram:
    """`torch.export.export` of `mode`'s head (eval). With `batch`, that batch size is fixed
    (what AOTInductor compiles fastest code for); otherwise it is dynamic, 1..`max_batch`.
    `fixed_hw`: H and W stay those of `input_shape` (ExecuTorch plans memory for bounded sizes).
    In-place activations become functional where nothing can observe it (`functional_activations`)."""
    if batch is None and max_batch == 1:
        batch = 1  # a dynamic dimension needs a range of at least two sizes
    head = make_head(net, mode, preprocess)
    # seeded: the program file stores its example input, and exports are byte-reproducible
    example = torch.randn(batch or EXAMPLE_BATCH, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation chatter from inside torch.export
        program = torch.export.export(head, (example,), dynamic_shapes=dynamic_shapes(net, batch, max_batch, fixed_hw),
                                      strict=False)
    functional_activations(program)
    return program


#: activations that networks apply in place (`nn.Hardswish(inplace=True)`) and torch.export keeps
#: so; ONNX's exporter translates their functional twins directly (torchlib), while it decomposes
#: the in-place form (aten.hardswish_ through clamp/where over symbolic sizes: MobileNetV3-Small's
#: conversion took 15.4 s with it, 7.9-8.9 s without, to the same ONNX graph)
IN_PLACE_ACTIVATIONS = ("relu_", "hardswish_", "hardsigmoid_", "hardtanh_", "silu_", "gelu_", "sigmoid_",
                        "tanh_", "leaky_relu_", "elu_", "mish_")


def functional_activations(program: torch.export.ExportedProgram) -> int:
    """Replace each in-place activation by its functional twin where nothing can see the
    difference: its input is a fresh tensor (not a graph input, a view or another op's alias)
    that nothing reads after it. Returns how many were replaced."""
    graph = program.graph_module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    replaced = 0
    for node in graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        name = target._schema.name.split("::")[-1]
        source = node.args[0] if node.args else None
        if name not in IN_PLACE_ACTIVATIONS or not isinstance(source, torch.fx.Node) or not _fresh(source):
            continue
        if any(order[user] > order[node] for user in source.users if user is not node):
            continue  # read after the activation: it sees the in-place result
        twin = getattr(getattr(torch.ops.aten, name[:-1], None), target._overloadname, None)
        if twin is None:
            continue
        node.target = twin
        replaced += 1
    if replaced:
        program.graph_module.recompile()
    return replaced


def _fresh(node: torch.fx.Node) -> bool:
    """Whether `node` is an op's new tensor (not an input, a view or an alias of another)."""
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and not any(r.alias_info is not None for r in target._schema.returns))


def derive_program(full: torch.export.ExportedProgram, mode: str,
                   output_names: Sequence[str]) -> torch.export.ExportedProgram:
    """`mode`'s program from the `'full'` head's: the same graph returning fewer outputs (in
    `mode`'s structure: a tensor, a tuple of two, or the list), dead nodes removed. The same
    program `torch.export` would trace for `mode`'s head, without tracing the network again."""
    from torch.export.graph_signature import OutputKind
    from torch.utils import _pytree as pytree

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


