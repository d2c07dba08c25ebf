"""ONNX export: one dynamo export of the `'full'` head, every mode derived from it.

The `'full'` graph computes everything the other heads compute, so `'out'`, `'features'` and
`'both'` are the same graph with fewer outputs (unused nodes pruned): one torch.export per
backbone instead of four. The exporter runs with `optimize=False` (its default optimiser folds
BatchNorm into conv weights, losing the parameters), followed by onnxscript's constant folding
and dead-node removal only: every parameter stays an initializer, bit-equal to eager, and
onnxruntime still fuses Conv+BN itself at session creation (measured: same speed as the
exporter's own BN folding).
"""

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import onnx
import onnx_ir as ir
import torch
from onnxscript import optimizer

from export.errors import ExportError
from export.manifest import SHARED_WEIGHTS
from export.program_export import export_program
from zoo.base import MammothBackbone, backbone_name, mode_outputs
from zoo.heads import BACKBONE_PREFIX, parameter_aliases

__all__ = ["OnnxExport", "export_onnx", "mode_outputs", "MIN_OPSET", "max_opset"]

#: the dynamo exporter's own implementations start at opset 18; below it only a lossy
#: version conversion (which silently falls back to 18 when it fails) is on offer
MIN_OPSET = 18


#: the oldest onnxruntime that loads a model of this IR version / runs this opset
#: (onnxruntime's compatibility table; measured here: IR 10 is refused by 1.17, loaded by 1.18)
_ORT_FOR_IR = {8: "1.10", 9: "1.15", 10: "1.18"}
_ORT_FOR_OPSET = {17: "1.13", 18: "1.14", 19: "1.15", 20: "1.17", 21: "1.18"}


def runtime_requirements(model: onnx.ModelProto) -> Dict[str, object]:
    """IR version, opset and the oldest onnxruntime that loads the model (None where the tables
    above do not reach: newer than they know, so at least the newest release they name)."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    need = [_ORT_FOR_IR.get(model.ir_version), _ORT_FOR_OPSET.get(opset)]
    known = None if None in need else max(need, key=lambda v: tuple(map(int, v.split("."))))
    import onnxruntime

    return {"ir_version": model.ir_version, "opset": opset, "onnxruntime_min": known,
            "onnxruntime_verified": onnxruntime.__version__}


def max_opset() -> int:
    """The newest opset the installed onnx knows (the exporter converts up to it)."""
    return onnx.defs.onnx_opset_version()

#: protobuf cannot serialise more than 2 GiB in one message
ONNX_SINGLE_FILE_LIMIT = 2**31 - 2**26


def weights_bytes(net: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


@dataclass
class OnnxExport:
    models: Dict[str, onnx.ModelProto]
    param_names: Dict[str, str]  # eager parameter name -> ONNX initializer name
    opset: int


def _rename_outputs(graph: ir.Graph, names: List[str]) -> None:
    """Give output i the name names[i]; an output that is also another output (an MLP's last
    hidden layer is its features) gets its own Identity so each name exists once."""
    used: set = set()
    for i, (value, name) in enumerate(zip(list(graph.outputs), names)):
        if value.name == name and name not in used:
            used.add(name)
            continue
        node = ir.Node("", "Identity", inputs=[value], num_outputs=1)
        node.outputs[0].name = name
        node.outputs[0].shape = value.shape
        node.outputs[0].type = value.type
        graph.append(node)
        graph.outputs[i] = node.outputs[0]
        used.add(name)


def _consumed(model: ir.Model) -> set:
    return {v.name for node in model.graph for v in node.inputs if v is not None}


def _keep_parameters_as_is(param_names: set):
    """A `should_fold` rule: never fold a node that reads a parameter's values (that would bake
    the parameter into a new constant, e.g. a transposed Linear weight), only its shape/type."""
    shape_only = {"Shape", "Size", "CastLike"}

    def should_fold(node: ir.Node):
        if node.op_type in shape_only:
            return None
        if any(v is not None and v.name in param_names for v in node.inputs):
            return False
        return None

    return should_fold


def _keep_all_parameters(model: ir.Model, net: MammothBackbone, prefix: str) -> Dict[str, str]:
    """Map every parameter to its initializer; add the ones the graph does not use (resnet32's
    `bn_final`, a head's unused classifier) so the file holds the whole flat vector."""
    inits = model.graph.initializers
    mapping: Dict[str, str] = {}
    params = dict(net.named_parameters())
    for name, aliases in parameter_aliases(net, prefix).items():
        found = next((a for a in aliases if a in inits), None)
        if found is None:
            found = prefix + name
            tensor = ir.tensor(params[name].detach().cpu().numpy(), name=found)
            value = ir.Value(name=found, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            model.graph.register_initializer(value)
        # Never map a parameter onto a transformed tensor: the initializer must be the
        # eager parameter, bit for bit.
        stored = inits[found].const_value.numpy()
        if stored.shape != tuple(params[name].shape) or not (stored == params[name].detach().cpu().numpy()).all():
            raise RuntimeError(f"ONNX initializer {found!r} is not parameter {name!r} bit for bit: "
                               "the exporter transformed it; flat vectors cannot map onto it")
        mapping[name] = found
    return mapping


def export_onnx(net: MammothBackbone, input_shape: Tuple[int, ...], opset: Optional[int] = None,
                device: str = "cpu", preprocess: Optional[torch.nn.Module] = None,
                weights_dir: Optional[Path] = None,
                program: Optional[torch.export.ExportedProgram] = None) -> OnnxExport:
    """Export `net` (in eval) once and derive the four mode graphs.

    `program` is the `'full'` head's torch.export program when the caller has it already (the
    `exported` format): the ONNX exporter translates it instead of tracing the network again.

    With `weights_dir`, every parameter goes into `weights_dir/weights.onnx.data` (written
    here) and every mode's graph refers to it (ONNX external data), so the weights are stored
    once; without it each graph is self-contained, which protobuf allows below 2 GiB.
    """
    size = weights_bytes(net)
    if size >= ONNX_SINGLE_FILE_LIMIT and weights_dir is None:
        raise ExportError(f"{backbone_name(net)}: {size / 2**30:.1f} GiB of weights; self-contained "
                          "ONNX files stop at 2 GiB: use shared weights (--onnx-weights shared)")
    if program is None:
        program = export_program(net, "full", input_shape, device, preprocess)
    full_names = net.output_names()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch.export)
        onnx_program = torch.onnx.export(
            program, (), None, dynamo=True, optimize=False, opset_version=opset,
            input_names=["x"], output_names=full_names, verbose=False, report=False,
        )
    model = onnx_program.model
    prefix = BACKBONE_PREFIX
    param_names = {a for aliases in parameter_aliases(net, prefix).values() for a in aliases}
    consumed = _consumed(model) & param_names
    optimizer.fold_constants(model, should_fold=_keep_parameters_as_is(param_names))
    optimizer.remove_unused_nodes(model)
    lost = consumed - _consumed(model)
    if lost:  # a parameter was folded into another constant: flat vectors could not reach it
        raise RuntimeError(f"ONNX optimisation folded parameters away: {sorted(lost)[:5]}")
    for node in model.graph:  # stack traces name the build machine's source paths
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    _rename_outputs(model.graph, full_names)
    mapping = _keep_all_parameters(model, net, prefix)
    if weights_dir is not None:
        _share_parameters(model, [mapping[n] for n, _ in net.named_parameters()], Path(weights_dir))
    full_proto = ir.serde.serialize_model(model)
    models: Dict[str, onnx.ModelProto] = {}
    for mode, names in mode_outputs(full_names).items():
        models[mode] = _select_outputs(full_proto, names) if mode != "full" else full_proto
    opset_used = next(o.version for o in full_proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and opset_used != opset:  # the exporter's conversion fell back
        raise ExportError(f"--opset {opset}: the exporter could not convert the graph and "
                          f"produced opset {opset_used}; supported: {MIN_OPSET}-{max_opset()}")
    for proto in models.values():
        proto.producer_name = "returnt-zoo"
    models = {m: _checked(p, weights_dir) for m, p in models.items()}
    return OnnxExport(models, mapping, opset_used)


def _checked(proto: onnx.ModelProto, weights_dir: Optional[Path]) -> onnx.ModelProto:
    """onnx.checker (full) and strict shape inference. A graph with external data is checked
    as a file beside its data (the checker resolves the data's location from the file's)."""
    if weights_dir is None:
        onnx.checker.check_model(proto, full_check=True)
        return onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    fd, name = tempfile.mkstemp(prefix=".check-", suffix=".onnx.tmp", dir=weights_dir)
    os.close(fd)
    try:
        onnx.save(proto, name)
        onnx.checker.check_model(name, full_check=True)
        onnx.shape_inference.infer_shapes_path(name, name, strict_mode=True)
        return onnx.load(name, load_external_data=False)
    finally:
        os.unlink(name)


def _share_parameters(model: ir.Model, names: List[str], weights_dir: Path) -> None:
    """Move the parameter initializers (in parameters() order) into one external-data file."""
    inits = model.graph.initializers
    tensors = [inits[n].const_value for n in names]
    external = ir.external_data.convert_tensors_to_external(tensors, base_dir=str(weights_dir),
                                                            relative_path=SHARED_WEIGHTS)
    for name, tensor in zip(names, external):
        inits[name].const_value = tensor


def _select_outputs(full: onnx.ModelProto, names: List[str]) -> onnx.ModelProto:
    """The full graph with only `names` as outputs, dead nodes removed, all initializers kept."""
    model = ir.serde.deserialize_model(full)
    by_name = {v.name: v for v in model.graph.outputs}
    model.graph.outputs.clear()
    for name in names:
        model.graph.outputs.append(by_name[name])
    initializers = dict(model.graph.initializers)
    optimizer.remove_unused_nodes(model)
    for name, value in initializers.items():  # keep every parameter (flat-vector round trips)
        if name not in model.graph.initializers:
            model.graph.register_initializer(ir.Value(
                name=name, shape=value.shape, type=value.type, const_value=value.const_value))
    return ir.serde.serialize_model(model)
