"""Flat parameter vectors round-trip between eager, TorchScript, ONNX and torch.export programs."""

import copy

import numpy as np
import onnx
import pytest
import torch

from export.errors import ParamsError
from export.formats.onnx import ort_session, read_onnx_params, write_onnx_params
from export.formats.program import load_program, program_params, set_program_params
from export.formats.torchscript import load_torchscript
from export.store.manifest import read_manifest
from tests.conftest import assert_within_bound, backbone_params, flat_outputs, has_format
from zoo import RETURNT_MODES

BACKBONES = backbone_params()



def _outputs(net, ts, onnx_path, mode, x):
    """eager, TorchScript (where the backbone has it: else eager again) and ONNX outputs."""
    with torch.no_grad():
        eager = [t.numpy() for t in flat_outputs(net(x, returnt=mode))]
        script = [t.numpy() for t in flat_outputs(ts(x))] if ts is not None else eager
    onnx_out = ort_session(onnx_path).run(None, {"x": x.numpy()})
    return eager, script, onnx_out


@pytest.mark.parametrize("mode", RETURNT_MODES)
@pytest.mark.parametrize("name", BACKBONES)
def test_params_identical_across_formats(name, mode, export):
    net, result = export
    v = net.get_params()
    if has_format(name, "torchscript"):
        assert torch.equal(load_torchscript(result.directory / f"{mode}.pt").get_params(), v)
    assert torch.equal(read_onnx_params(result.directory / f"{mode}.onnx"), v)
    layout = result.manifest.flat_params.layout
    program = load_program(result.directory / f"{mode}.ep.pt2")
    assert torch.equal(program_params(program, layout), v)
    # the program's parameters, in state_dict order, are parameters() in order (by any alias)
    names = [n for n in program.graph_signature.parameters]
    firsts = [next(n for n in names if n in e.program_names) for e in layout]
    assert sorted(firsts, key=names.index) == firsts


@pytest.mark.parametrize("mode", RETURNT_MODES)
@pytest.mark.parametrize("name", BACKBONES)
def test_new_vector_gives_same_outputs_everywhere(name, mode, export, tmp_path):
    net, result = export
    net = copy.deepcopy(net)
    ts = load_torchscript(result.directory / f"{mode}.pt") if has_format(name, "torchscript") else None
    src = result.directory / f"{mode}.onnx"
    shape = result.manifest.input.shape[1:]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(3))
    before = _outputs(net, ts, src, mode, x)[0]
    v = net.get_params()
    # a relative change: the test weights' BN statistics fit them, and an additive one blows
    # a deep network's activations up to ~1e14 (tv-efficientnet-b0), where nothing compares
    new = v * (1 + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4)))
    net.set_params(new)
    if ts is not None:
        ts.set_params(new)
        assert torch.equal(ts.get_params(), new)
    out = write_onnx_params(src, new, tmp_path / "new.onnx", manifest=result.manifest)
    assert torch.equal(read_onnx_params(out, result.manifest), new)
    eager, script, onnx_out = _outputs(net, ts, out, mode, x)
    for e, s, o in zip(eager, script, onnx_out):
        assert_within_bound(s, e)
        assert_within_bound(o, e)
    layout = result.manifest.flat_params.layout
    program = load_program(result.directory / f"{mode}.ep.pt2")
    set_program_params(program, new, layout)  # in memory; writing files is tested in test_engines
    assert torch.equal(program_params(program, layout), new)
    with torch.no_grad():
        for g, e in zip(flat_outputs(program.module()(x)), eager):
            assert_within_bound(g.numpy(), e)
    assert any(not np.allclose(a, b, rtol=1e-3, atol=1e-3) for a, b in zip(eager, before)), \
        "outputs did not change: the test could not fail"


@pytest.mark.parametrize("mode", RETURNT_MODES)
@pytest.mark.parametrize("name", backbone_params(fmt="torchscript"))
def test_grads_agree_eager_and_torchscript(name, mode, export):
    net, result = export
    net = copy.deepcopy(net)
    ts = load_torchscript(result.directory / f"{mode}.pt")
    shape = result.manifest.input.shape[1:]
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(5))
    with pytest.raises(torch.jit.Error, match="no parameter has a gradient yet"):
        ts.get_grads()  # TorchScript raises its own error type around the RuntimeError
    # (t - 1)**2, not t**2: some classifiers start at zero (torchvision's ViT head)
    loss_eager = sum((t - 1).square().mean() for t in flat_outputs(net(x, returnt=mode)))
    loss_eager.backward()
    loss_ts = sum((t - 1).square().mean() for t in flat_outputs(ts(x)))
    loss_ts.backward()
    g_eager, g_ts = net.get_grads(), ts.get_grads()
    torch.testing.assert_close(g_ts, g_eager, rtol=1e-4, atol=1e-6)
    assert g_ts.abs().sum() > 0
    ts.set_grads(g_eager * 3)
    net.set_grads(g_eager * 3)
    torch.testing.assert_close(ts.get_grads(), net.get_grads())


@pytest.mark.parametrize("name", backbone_params("resnet32"))
def test_unused_parameters_round_trip(name, export, tmp_path):
    """resnet32's bn_final is in no graph, but in every file's flat vector."""
    net, result = export
    layout = {e.name: e for e in result.manifest.flat_params.layout}
    assert layout["bn_final.weight"].onnx_name == "backbone.bn_final.weight"
    assert torch.equal(read_onnx_params(result.directory / "out.onnx"), net.get_params())


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_bad_vectors_and_files(name, export, tmp_path):
    net, result = export
    src = result.directory / "out.onnx"
    ts = load_torchscript(result.directory / "out.pt")
    n = net.num_params()
    cases = [
        (torch.zeros(n - 1), f"expected {n} elements, got {n - 1}"),
        (torch.zeros(n, dtype=torch.float64), "expected dtype torch.float32"),
        (torch.zeros(2, n // 2), "1-D"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            write_onnx_params(src, bad, tmp_path / "o.onnx")
        with pytest.raises(Exception, match=msg.split(",")[0]):
            ts.set_params(bad)
    nan = net.get_params().clone()
    nan[3] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/inf values; pass allow_nonfinite=True"):
        write_onnx_params(src, nan, tmp_path / "o.onnx")
    assert not (tmp_path / "o.onnx").exists()
    out = write_onnx_params(src, nan, tmp_path / "o.onnx", manifest=result.manifest, allow_nonfinite=True)
    assert torch.isnan(read_onnx_params(out, result.manifest)[3])
    with pytest.raises(ParamsError, match="write to a new file"):
        write_onnx_params(src, net.get_params(), src)
    not_onnx = tmp_path / "x.onnx"
    not_onnx.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ParamsError, match="not an ONNX model"):
        read_onnx_params(not_onnx, result.manifest)
    manifest = read_manifest(result.directory)
    manifest.flat_params.layout[0].shape = [784, 32]  # same length, other shape
    with pytest.raises(ParamsError,
                       match=r"do not match the manifest: shape of backbone\.\S+ \[32, 784\] != \[784, 32\]"):
        read_onnx_params(src, manifest)
    manifest.flat_params.layout[0].shape = [1, 2]
    with pytest.raises(ParamsError,
                       match=r"layout is inconsistent: fc1.weight: length 25088 != product of shape \[1, 2\]"):
        read_onnx_params(src, manifest)
    manifest.flat_params.layout[0].shape = [32, 784]
    manifest.flat_params.layout[0].onnx_name = "nope"
    with pytest.raises(ParamsError, match="missing nope"):
        read_onnx_params(src, manifest)


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_external_data_files(name, export, tmp_path):
    net, result = export
    src = tmp_path / "ext.onnx"
    model = onnx.load(str(result.directory / "out.onnx"))
    onnx.save(model, str(src), save_as_external_data=True, location="ext.onnx.data")
    new = net.get_params() * 2
    out = write_onnx_params(src, new, tmp_path / "ext2.onnx", manifest=result.manifest)
    assert (tmp_path / "ext2.onnx.data").exists()
    assert not list(tmp_path.glob(".*.tmp"))
    assert torch.equal(read_onnx_params(out, result.manifest), new)
    ort_session(out).run(None, {"x": np.zeros((1, *result.manifest.input.shape[1:]), np.float32)})


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_params_cli(name, export, tmp_path, capsys):
    from export.cli import main

    net, result = export
    src = result.directory / "out.onnx"
    assert main(["params", "read", str(src), "--out", str(tmp_path / "v.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "v.npy"), net.get_params().numpy())
    torch.save(net.get_params() * 0.5, tmp_path / "half.pt")
    assert main(["params", "write", str(src), str(tmp_path / "half.pt"), "--out", str(tmp_path / "h.onnx"),
                 "--manifest", str(result.directory / "manifest.json")]) == 0
    assert torch.equal(read_onnx_params(tmp_path / "h.onnx", result.manifest), net.get_params() * 0.5)
    # TorchScript files too: read, and write a copy holding the new vector
    assert main(["params", "read", str(result.directory / "out.pt"), "--out", str(tmp_path / "ts.npy")]) == 0
    assert np.array_equal(np.load(tmp_path / "ts.npy"), net.get_params().numpy())
    assert main(["params", "write", str(result.directory / "out.pt"), str(tmp_path / "half.pt"),
                 "--out", str(tmp_path / "half-out.pt")]) == 0
    assert torch.equal(load_torchscript(tmp_path / "half-out.pt").get_params(), net.get_params() * 0.5)
    (tmp_path / "v.txt").write_text("1 2 3")
    assert main(["params", "read", str(tmp_path / "v.txt")]) == 2
    err = capsys.readouterr().err
    assert "not an exported file; expected a name ending in .pt, .onnx, .ep.pt2, .pte, .aoti.pt2" in err
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    assert main(["params", "read", str(tmp_path / "junk.onnx"),
                 "--manifest", str(result.directory / "manifest.json")]) == 2
    assert "not an ONNX model" in capsys.readouterr().err
