"""Eager vs exported for every backbone x mode x format, artifacts and manifest."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from export.formats import DEFAULT_FORMATS
from export.formats.onnx import ort_session
from export.formats.program import load_program
from export.formats.torchscript import load_torchscript
from export.store.manifest import artifact_name
from tests.conftest import (
    assert_within_bound,
    backbone_format_params,
    backbone_params,
    flat_outputs,
    has_format,
)
from zoo import RETURNT_MODES

BACKBONES = backbone_params()



@pytest.mark.parametrize("name", BACKBONES)
def test_export_succeeds_with_manifest(name, export):
    net, result = export
    assert result.ok, result.failures
    m = result.manifest
    formats = [f for f in DEFAULT_FORMATS if has_format(name, f)]
    assert m.formats == formats
    assert set(m.files) == {artifact_name(mode, f) for mode in RETURNT_MODES for f in formats}
    for fname, entry in m.files.items():
        path = result.directory / fname
        assert path.stat().st_size == entry.size and len(entry.sha256) == 64
    assert m.backbone.name == getattr(net, "registry_name", type(net).__name__)
    assert m.input.name == "x"
    assert m.input.shape[0] == "batch"
    full = m.modes["full"].outputs
    assert [(o.name, o.shape) for o in full[-2:]] == [
        ("features", ["batch", net.feature_dim]), ("logits", m.modes["out"].outputs[0].shape)]
    assert [o.name for o in full] == net.output_names()
    assert [o.module for o in full[:-2]] == [s.name for s in net.stages]
    assert m.opset >= 18 and {"torch", "onnx", "onnxruntime", "returnt_zoo"} <= set(m.versions)
    assert m.onnx["ir_version"] == onnx.load(str(result.directory / "out.onnx")).ir_version
    assert m.onnx["opset"] == m.opset and m.onnx["onnxruntime_verified"]
    layout = m.flat_params.layout
    assert [e.name for e in layout] == [n for n, _ in net.named_parameters()]
    assert sum(e.length for e in layout) == net.num_params() == m.flat_params.count
    for fmt in formats:
        for mode in RETURNT_MODES:
            stats = m.verification[fmt][mode]
            assert all(s["ok"] for s in stats.values()), (fmt, mode, stats)
    assert m.timing["seconds"]["onnx_export"] > 0
    for mode in RETURNT_MODES:
        info = m.programs[artifact_name(mode, "exported")]
        assert info.dynamic == m.input.dynamic and info.mode == mode
    assert not list(result.directory.glob(".*.tmp")), "temp files left behind"


@pytest.mark.parametrize("name", BACKBONES)
def test_manifest_stage_shapes_hold_at_another_input_size(name, export):
    """The manifest's symbolic stage shapes (ceil(height/reduction)) are the real ones."""
    net, result = export
    m = result.manifest
    c, h, w = m.input.shape[1:] if len(m.input.shape) == 4 else (None, None, None)
    size = {"height": h + 8, "width": w + 16} if "height" in m.input.dynamic else {"height": h, "width": w}
    x = torch.randn(1, *(m.input.shape[1:] if c is None else (c, size["height"], size["width"])))
    with torch.no_grad():
        outs = net(x, returnt="full")
    for out, spec in zip(outs, m.modes["full"].outputs):
        want = []
        for dim in spec.shape[1:]:
            if isinstance(dim, int):
                want.append(dim)
            else:
                rounding, _, rest = dim.rstrip(")").rpartition("(")
                key, _, factor = rest.partition("/")
                n, r = size[key], int(factor or 1)
                want.append(n // r if rounding == "floor" else -(-n // r))
        assert list(out.shape[1:]) == want, (spec.name, spec.shape, list(out.shape))


def _raw_loader(fmt: str, path, names):
    """The file loaded as a user of that format loads it, as `x -> list of numpy arrays`."""
    if fmt == "onnx":
        session = ort_session(path)
        return lambda x: session.run(names, {"x": x.numpy()})
    module = load_torchscript(path) if fmt == "torchscript" else load_program(path).module()
    return lambda x: [t.numpy() for t in flat_outputs(module(x))]


@pytest.mark.parametrize("mode", RETURNT_MODES)
@pytest.mark.parametrize("name, fmt", backbone_format_params(DEFAULT_FORMATS))
def test_exported_matches_eager(name, mode, fmt, export):
    """Fresh runtime, two batch sizes that the export never saw (1 and 5)."""
    net, result = export
    path = result.directory / artifact_name(mode, fmt)
    names = [o.name for o in result.manifest.modes[mode].outputs]
    shape = result.manifest.input.shape[1:]
    run = _raw_loader(fmt, path, names)
    for batch in (1, 5):
        x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(batch + 7))
        with torch.no_grad():
            want = [t.numpy() for t in flat_outputs(net(x, returnt=mode))]
            got = run(x)
        assert len(got) == len(want) == len(names)
        for g, w in zip(got, want):
            assert_within_bound(g, w)


@pytest.mark.parametrize("name", BACKBONES)
def test_onnx_graph_is_inference_only(name, export):
    _, result = export
    for mode in RETURNT_MODES:
        model = onnx.load(str(result.directory / f"{mode}.onnx"))
        onnx.checker.check_model(model, full_check=True)
        for node in model.graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert not (node.op_type == "BatchNormalization" and attrs.get("training_mode")), node.name
            assert node.op_type != "Dropout" or len(node.input) < 3
        assert [i.name for i in model.graph.input] == ["x"]
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert dims[0].dim_param, "batch dimension must be dynamic"
        assert len(model.graph.initializer) > 0


def _verifier_of_full(net, manifest, fmt: str):
    """`path -> whether the export's own verification passes` for a 'full' file of `fmt`."""
    from export.pipeline.verify import eager_outputs, verify_file
    from export.store.tolerance import sample_inputs

    names = manifest.output_names("full")
    inputs = sample_inputs(manifest.input.shape[1:])
    expected = eager_outputs(net, "full", inputs, "cpu")
    return lambda path: all(s["ok"] for s in verify_file(fmt, path, names, inputs, expected, "cpu").values())


def _tamper_onnx(source, manifest, tmp_path):
    """A copy of the ONNX file with one initializer its graph reads changed."""
    from onnx import numpy_helper

    model = onnx.load(str(source))
    consumed = {i for node in model.graph.node for i in node.input}
    entry = next(e for e in manifest.flat_params.layout if e.onnx_name in consumed)
    init = next(t for t in model.graph.initializer if t.name == entry.onnx_name)
    values = numpy_helper.to_array(init).copy()
    values.flat[0] += max(0.1, float(np.abs(values).max()))
    init.CopyFrom(numpy_helper.from_array(values, init.name))
    onnx.save(model, str(tmp_path / source.name))
    return tmp_path / source.name, entry.name


def _tamper_program(source, manifest, tmp_path):
    """A copy of the program with one parameter its graph reads changed (every alias of it)."""
    from export.formats.base import used_parameters
    from export.formats.program import program_bytes

    program = load_program(source)
    used = used_parameters(program)
    entry = next(e for e in manifest.flat_params.layout if set(e.program_names) & used)
    with torch.no_grad():
        for alias in set(entry.program_names) & used:
            t = program.state_dict[alias]
            t.view(-1)[0] += max(0.1, float(t.abs().max()))
    (tmp_path / source.name).write_bytes(program_bytes(program))
    return tmp_path / source.name, entry.name


@pytest.mark.parametrize("fmt, tamper", [("onnx", _tamper_onnx), ("exported", _tamper_program)],
                         ids=["onnx", "exported"])
@pytest.mark.parametrize("name", BACKBONES)
def test_one_changed_weight_fails_verification(name, fmt, tamper, export, tmp_path):
    """Verification can fail: the export's own check, which passed the file (the same function on
    the same seeded inputs, recorded in the manifest), rejects it with one weight changed."""
    net, result = export
    source = result.directory / artifact_name("full", fmt)
    verify = _verifier_of_full(net, result.manifest, fmt)
    assert all(s["ok"] for s in result.manifest.verification[fmt]["full"].values())
    tampered, changed = tamper(source, result.manifest, tmp_path)
    assert not verify(tampered), f"{changed} changed, yet verified"


@pytest.mark.parametrize("name", BACKBONES)
def test_outputs_have_unit_scale(name, export):
    """Random test weights keep every output far from zero (BN statistics from a forward pass)."""
    net, result = export
    x = torch.randn(3, *result.manifest.input.shape[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for out, spec in zip(net(x, returnt="full"), result.manifest.modes["full"].outputs):
            assert out.abs().max() > 1e-2, (spec.name, float(out.abs().max()))


@pytest.mark.parametrize("name", backbone_params("resnet18", "mnistmlp"))
def test_artifacts_load_without_the_zoo(name, export):
    _, result = export
    code = f"""
import sys, numpy as np, torch, onnxruntime as ort, warnings
warnings.simplefilter("ignore")
d = {str(result.directory)!r}
m = torch.jit.load(d + "/full.pt")
shape = {result.manifest.input.shape[1:]!r}
x = torch.randn(2, *shape)
outs = m(x)
s = ort.InferenceSession(d + "/full.onnx", providers=["CPUExecutionProvider"])
o = s.run(None, {{"x": x.numpy()}})
assert len(o) == len(outs)
assert np.abs(o[-1] - outs[-1].detach().numpy()).max() < 1e-3
assert m.get_params().numel() > 0
p = torch.export.load(d + "/full.ep.pt2").module()
assert all((a - b).abs().max() < 1e-3 for a, b in zip(p(x), outs))
assert not any(k == "zoo" or k.startswith("zoo.") or k.startswith("export") for k in sys.modules), "zoo imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True,
                          cwd=result.directory)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
