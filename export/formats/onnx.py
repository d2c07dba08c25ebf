"""ONNX (`<mode>.onnx`): the `'full'` head's torch.export program translated by the dynamo
exporter once, every mode derived from it; onnxruntime sessions; flat parameter vectors of
ONNX files (the manifest's layout names each parameter's initializer, `onnx_name`).

The `'full'` graph computes everything the other heads compute, so `'out'`, `'features'` and
`'both'` are the same graph with fewer outputs (unused nodes pruned): one torch.export per
backbone instead of four. The exporter runs with `optimize=False` (its default optimiser folds
BatchNorm into conv weights, losing the parameters), followed by onnxscript's constant folding
and dead-node removal only: every parameter stays an initializer, bit-equal to eager, and
onnxruntime still fuses Conv+BN itself at session creation (measured: same speed as the
exporter's own BN folding).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import Tensor

from export.errors import ExportError, ParamsError
from export.formats.base import Format, Layout, Source
from export.formats.onnx_registry import reused_registry
from export.store.atomic import atomic_path
from export.store.flat_vector import Buffers, check_params_vector, checked_layout, prefixed_buffers
from export.store.manifest import ARTIFACT_SUFFIX, SHARED_WEIGHTS, Manifest, read_manifest, refuse_export_file
from zoo.base import MammothBackbone, backbone_name, mode_outputs
from zoo.heads import BACKBONE_PREFIX, parameter_aliases

if TYPE_CHECKING:  # onnx_ir and onnxscript load in ~1 s: only exporting needs them
    import onnx_ir as ir

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
    import onnx_ir as ir

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


def _keep_all_parameters(model: ir.Model, net: MammothBackbone, prefix: str,
                         aliases_of: Dict[str, List[str]]) -> Dict[str, str]:
    """Map every parameter to its initializer; add the ones the graph does not use (resnet32's
    `bn_final`, a head's unused classifier) so the file holds the whole flat vector."""
    import onnx_ir as ir

    inits = model.graph.initializers
    mapping: Dict[str, str] = {}
    params = dict(net.named_parameters())
    for name, aliases in aliases_of.items():
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


def export_onnx(net: MammothBackbone, program: torch.export.ExportedProgram, opset: Optional[int] = None,
                weights_dir: Optional[Path] = None) -> OnnxExport:
    """Translate the `'full'` head's program (of `net`, in eval) once and derive the four mode
    graphs.

    With `weights_dir`, every parameter goes into `weights_dir/weights.onnx.data` (written
    here) and every mode's graph refers to it (ONNX external data), so the weights are stored
    once; without it each graph is self-contained, which protobuf allows below 2 GiB.
    """
    import onnx_ir as ir
    from onnxscript import optimizer

    size = weights_bytes(net)
    if size >= ONNX_SINGLE_FILE_LIMIT and weights_dir is None:
        raise ExportError(f"{backbone_name(net)}: {size / 2**30:.1f} GiB of weights; self-contained "
                          "ONNX files stop at 2 GiB: use shared weights (--onnx-weights shared)")
    full_names = net.output_names()
    with warnings.catch_warnings(), reused_registry():
        warnings.simplefilter("ignore")  # exporter chatter (deprecations inside torch.export)
        onnx_program = torch.onnx.export(
            program, (), None, dynamo=True, optimize=False, opset_version=opset,
            input_names=["x"], output_names=full_names, verbose=False, report=False,
        )
    model = onnx_program.model
    prefix = BACKBONE_PREFIX
    aliases_of = parameter_aliases(net, prefix)  # computed once: the fold rule and the mapping use it
    param_names = {a for aliases in aliases_of.values() for a in aliases}
    consumed = _consumed(model) & param_names
    optimizer.fold_constants(model, should_fold=_keep_parameters_as_is(param_names))
    optimizer.remove_unused_nodes(model)
    lost = consumed - _consumed(model)
    if lost:  # a parameter was folded into another constant: flat vectors could not reach it
        raise RuntimeError(f"ONNX optimisation folded parameters away: {sorted(lost)[:5]}")
    for node in model.graph:  # stack traces name the build machine's source paths
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)
    _rename_outputs(model.graph, full_names)
    mapping = _keep_all_parameters(model, net, prefix, aliases_of)
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
    """onnx.checker and strict, type-checked shape inference: what `check_model(full_check=True)`
    runs (the checker, then inference with check_type and strict mode on a copy it discards), in
    one inference pass whose result is kept. A graph with external data is checked as a file
    beside its data (the checker resolves the data's location from the file's)."""
    if weights_dir is None:
        data = proto.SerializeToString()
        onnx.checker.check_model(data)
        return onnx.shape_inference.infer_shapes(data, check_type=True, strict_mode=True)
    fd, name = tempfile.mkstemp(prefix=".check-", suffix=".onnx.tmp", dir=weights_dir)
    os.close(fd)
    try:
        onnx.save(proto, name)
        onnx.checker.check_model(name)
        onnx.shape_inference.infer_shapes_path(name, name, check_type=True, strict_mode=True)
        return onnx.load(name, load_external_data=False)
    finally:
        os.unlink(name)


def _share_parameters(model: ir.Model, names: List[str], weights_dir: Path) -> None:
    """Move the parameter initializers (in parameters() order) into one external-data file."""
    import onnx_ir as ir

    inits = model.graph.initializers
    tensors = [inits[n].const_value for n in names]
    external = ir.external_data.convert_tensors_to_external(tensors, base_dir=str(weights_dir),
                                                            relative_path=SHARED_WEIGHTS)
    for name, tensor in zip(names, external):
        inits[name].const_value = tensor


def _select_outputs(full: onnx.ModelProto, names: List[str]) -> onnx.ModelProto:
    """The full graph with only `names` as outputs, dead nodes removed, all initializers kept."""
    import onnx_ir as ir
    from onnxscript import optimizer

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


# ---------------------------------------------------------------- onnxruntime sessions
def ort_providers(device: str) -> List[str]:
    import onnxruntime as ort

    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")


def ort_session(source, device: str = "cpu", threads: Optional[int] = None, optimization: str = "all",
                providers: Optional[Sequence[str]] = None, log_level: int = 3, spin_wait: bool = True):
    """The one way this project makes an onnxruntime session.

    Args:
        source: a path, or the model's bytes (so what runs is what was hashed).
        device: cpu or cuda (the CUDA provider where onnxruntime has it).
        threads: intra-op threads; None: torch's (`torch.get_num_threads()`, all cores unless
            the process chose fewer), so one setting budgets both runtimes.
        optimization: graph optimisation level, one of OPTIMIZATION_LEVELS.
        providers: explicit execution providers (default: from `device`).
        log_level: 3 = errors only (unused parameter initializers are kept on purpose and would
            warn at 2).
        spin_wait: intra-op threads busy-wait for work between calls (onnxruntime's default:
            lowest latency for a process that has the cores to itself). Off where other processes
            need the same cores between calls, as in a server's proxy and ingress.
    """
    import onnxruntime as ort

    if optimization not in OPTIMIZATION_LEVELS:
        raise ValueError(f"unknown optimization {optimization!r}; allowed: {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.log_severity_level = log_level
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    if not spin_wait:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    model = source if isinstance(source, bytes) else str(source)
    return ort.InferenceSession(model, options, providers=list(providers or ort_providers(device)))


# ---------------------------------------------------------------- flat parameters
def layout_for(path: Path, manifest: Optional[Manifest] = None) -> Layout:
    """The ONNX flat-parameter layout: from `manifest`, else the manifest.json beside `path`."""
    manifest = manifest if manifest is not None else read_manifest(Path(path).parent)
    return checked_layout(manifest, path, onnx=True)


def model_from_bytes(data: bytes, path: Path) -> onnx.ModelProto:
    """Parse an ONNX model with a one-line error for a corrupt or foreign file."""
    return _parsed(path, lambda: onnx.load_model_from_string(data))


def load_onnx(path: Path) -> onnx.ModelProto:
    """onnx.load (external data included) with a one-line error for a missing, corrupt or
    foreign file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such file")
    return _parsed(path, lambda: onnx.load(str(path)))


def _parsed(path: Path, parse) -> onnx.ModelProto:
    try:
        model = parse()
    except Exception as exc:  # protobuf DecodeError and friends
        raise ParamsError(f"{path}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ParamsError(f"{path}: not an ONNX model (empty graph)")
    return model


def _initializers(model: onnx.ModelProto, layout, path) -> Dict[str, onnx.TensorProto]:
    inits = {t.name: t for t in model.graph.initializer}
    missing = [e.onnx_name for e in layout if e.onnx_name not in inits]
    if missing:
        raise ParamsError(f"{path}: initializers do not match the manifest: missing "
                              f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    bad = [f"{e.onnx_name} {list(inits[e.onnx_name].dims)} != {e.shape}" for e in layout
           if list(inits[e.onnx_name].dims) != list(e.shape)]
    if bad:
        raise ParamsError(f"{path}: initializers do not match the manifest: shape of "
                              + "; ".join(bad[:3]))
    return inits


def params_of_model(model: onnx.ModelProto, layout, path) -> Tensor:
    """The flat vector held by a loaded model's initializers, in layout order."""
    inits = _initializers(model, layout, path)
    parts = [numpy_helper.to_array(inits[e.onnx_name]).reshape(-1) for e in layout]
    return torch.from_numpy(np.concatenate(parts).astype(np.float32, copy=False))


def read_onnx_params(path: Path, manifest: Optional[Manifest] = None) -> Tensor:
    """The flat parameter vector stored in an exported ONNX file (== eager `get_params()`).

    Args:
        path: an ONNX file written by the export (or by `write_onnx_params`).
        manifest: its export's manifest (default: the manifest.json beside `path`).
    """
    return params_of_model(load_onnx(path), layout_for(path, manifest), path)


def set_model_params(model: onnx.ModelProto, vector: Tensor, layout, path="model",
                     allow_nonfinite: bool = False, buffers: Optional[Buffers] = None) -> onnx.ModelProto:
    """Write `vector` into the initializers of `model` (in place), validated first, and
    `buffers` (eager names) into the initializers that hold them (BatchNorm's running
    statistics; a buffer the graph does not read has none)."""
    check_params_vector(vector, layout, allow_nonfinite)
    inits = _initializers(model, layout, path)
    array = vector.detach().cpu().numpy()
    replacements = []
    for e in layout:
        old = inits[e.onnx_name]
        chunk = array[e.offset:e.offset + e.length].reshape(e.shape)
        replacements.append((old, numpy_helper.from_array(chunk.astype(np.float32), old.name)))
    for name, value in prefixed_buffers(buffers).items():
        old = inits.get(name)
        if old is None:
            continue
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
        if list(old.dims) != list(value.shape) or not np.issubdtype(dtype, np.floating):
            raise ParamsError(f"{path}: initializer {name} {list(old.dims)} does not hold buffer "
                              f"{name[len(BACKBONE_PREFIX):]} {list(value.shape)}")
        replacements.append((old, numpy_helper.from_array(value.numpy().astype(dtype), old.name)))
    for old, new in replacements:  # all validated and converted: now change the model
        old.CopyFrom(new)
    return model


def write_onnx_params(path: Path, vector: Tensor, out: Path,
                      manifest: Optional[Manifest] = None,
                      allow_nonfinite: bool = False) -> Path:
    """A copy of the ONNX file at `path` with `vector` as its parameters, written atomically
    (`manifest`: its export's, default the manifest.json beside `path`)."""
    return _write_params(path, vector, out, layout_for(path, manifest), allow_nonfinite)


def _write_params(path: Path, vector: Tensor, out: Path, layout: Layout, allow_nonfinite: bool = False) -> Path:
    path, out = Path(path), Path(out)
    model = load_onnx(path)
    if any(e.onnx_name is None for e in layout):
        raise ParamsError(f"{path}: the manifest has no ONNX parameter layout (export with --formats including onnx)")
    if out.resolve() == path.resolve():
        raise ParamsError(f"{out}: write to a new file; overwriting an exported artifact would "
                              "break its sha256 in the manifest")
    refuse_export_file(out)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    set_model_params(model, vector, layout, path, allow_nonfinite)
    if external:
        data_name = out.name + ".data"
        refuse_export_file(out.parent / data_name)
        # the data file is renamed into place first, then the graph that refers to it
        with atomic_path(out) as tmp, atomic_path(out.parent / data_name) as tmp_data:
            onnx.save(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=tmp_data.name)
            # the graph must name the final data file, not its temporary name
            model_ref = onnx.load(str(tmp), load_external_data=False)
            for t in model_ref.graph.initializer:
                for kv in t.external_data:
                    if kv.key == "location":
                        kv.value = data_name
            onnx.save(model_ref, str(tmp))
    else:
        with atomic_path(out) as tmp:
            onnx.save(model, str(tmp))
    return out



def write_shared_weights(graph: Path, data_file: Path, vector: Tensor, layout: Layout) -> None:
    """Write `vector` into the shared external-data file at the offsets `graph` names for each
    parameter (every mode's graph reads the same file), atomically."""
    where = {t.name: {kv.key: kv.value for kv in t.external_data}
             for t in onnx.load(str(graph), load_external_data=False).graph.initializer
             if t.data_location == onnx.TensorProto.EXTERNAL}
    data = bytearray(Path(data_file).read_bytes())
    values = vector.detach().cpu().numpy().astype("<f4")
    for e in layout:
        place = where.get(e.onnx_name)
        chunk = values[e.offset:e.offset + e.length].tobytes()
        if place is None or int(place.get("length", -1)) != len(chunk):
            raise ParamsError(f"{graph}: {e.onnx_name} is not where the layout expects it "
                              f"in {Path(data_file).name}")
        start = int(place.get("offset", 0))
        data[start:start + len(chunk)] = chunk
    with atomic_path(Path(data_file)) as tmp:
        tmp.write_bytes(bytes(data))


def _write(model: onnx.ModelProto, path: Path) -> Optional[Dict[str, Any]]:
    Path(path).write_bytes(model.SerializeToString())
    return None


def _load(source: Source, device: str = "cpu") -> Callable[[Tensor], Any]:
    session = ort_session(source, device)
    return lambda x: session.run(None, {"x": x.cpu().numpy()})


def _read_params(path: Path, layout: Layout) -> Tensor:
    if any(e.onnx_name is None for e in layout):
        raise ParamsError(f"{path}: the manifest has no ONNX parameter layout (export with --formats including onnx)")
    return params_of_model(load_onnx(path), layout, path)


FORMAT = Format("onnx", ARTIFACT_SUFFIX["onnx"], _write, _load, _read_params, _write_params)
