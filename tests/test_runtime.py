"""OnnxBackbone (the returnt API in onnxruntime) and `python -m export verify`."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch

from export.cli import main
from export.errors import ManifestError
from export.runtime import OnnxBackbone
from tests.conftest import assert_within_bound, backbone_params, flat_outputs
from zoo import RETURNT_MODES

BACKBONES = backbone_params()




@pytest.mark.parametrize("mode", RETURNT_MODES)
@pytest.mark.parametrize("name", BACKBONES)
def test_onnx_backbone_matches_eager(name, mode, export):
    net, result = export
    onnx_net = OnnxBackbone(result.directory, threads=2)
    x = torch.randn(3, *onnx_net.input_shape, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = net(x, returnt=mode)
    got = onnx_net(x, returnt=mode)
    assert type(got) is type(want)
    assert all(isinstance(t, torch.Tensor) for t in flat_outputs(got))
    for g, w in zip(flat_outputs(got), flat_outputs(want)):
        assert_within_bound(g.numpy(), w.numpy())
    got_np = onnx_net(x.numpy(), returnt=mode)
    assert all(isinstance(t, np.ndarray) for t in flat_outputs(got_np))


@pytest.mark.parametrize("name", backbone_params("resnet18"))
def test_onnx_backbone_bad_input(name, export, tmp_path):
    _, result = export
    net = OnnxBackbone(result.directory)
    with pytest.raises(ValueError, match=r"rank 3; expected rank 4: \[batch, 3, any, any\]"):
        net(np.zeros((3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"does not fit; expected \[batch, 3, any, any\] with batch >= 1"):
        net(np.zeros((1, 1, 32, 32), np.float32))
    with pytest.raises(TypeError, match="input dtype int64 is not floating point"):
        net(np.zeros((1, 3, 32, 32), np.int64))
    with pytest.raises(TypeError, match="numpy array or torch tensor"):
        net([[1.0]])
    with pytest.raises(ValueError, match="unknown returnt 'all'"):
        net(np.zeros((1, 3, 32, 32), np.float32), returnt="all")
    x = torch.randn(1, 3, 32, 40).transpose(2, 3)  # non-contiguous, H=40 W=32, float32
    ref = net(x.contiguous())
    torch.testing.assert_close(net(x), ref)
    torch.testing.assert_close(net(x.double()), ref, rtol=1e-5, atol=1e-5)  # float64 converted
    with pytest.raises(ManifestError, match="no manifest.json"):
        OnnxBackbone(tmp_path)
    with pytest.raises(ValueError, match="unknown optimization"):
        OnnxBackbone(result.directory, optimization="max")


@pytest.mark.parametrize("name", backbone_params("resnet32"))
def test_onnx_backbone_fixed_size(name, export):
    _, result = export
    with pytest.raises(ValueError, match=r"does not fit; expected \[batch, 3, 32, 32\] with batch >= 1$"):
        OnnxBackbone(result.directory)(np.zeros((1, 3, 64, 64), np.float32))


@pytest.mark.parametrize("name", backbone_params("resnet18", "mnistmlp"))
def test_onnx_backbone_set_params(name, export):
    net, result = export
    net = copy.deepcopy(net)
    onnx_net = OnnxBackbone(result.directory, optimization="basic")
    x = torch.randn(2, *onnx_net.input_shape, generator=torch.Generator().manual_seed(2))
    before = onnx_net(x, returnt="full")
    assert torch.equal(onnx_net.get_params(), net.get_params())
    new = net.get_params() * 0.9
    with pytest.raises(ValueError, match="expected"):
        onnx_net.set_params(new[:-1])
    onnx_net.set_params(new)
    net.set_params(new)
    with torch.no_grad():
        want = net(x, returnt="full")
    after = onnx_net(x, returnt="full")
    assert not torch.allclose(after[-1], before[-1])
    for g, w in zip(after, want):
        assert_within_bound(g.numpy(), w.numpy())
    assert torch.equal(onnx_net.get_params(), new)


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_verify_command(name, export, tmp_path, capsys):
    _, result = export
    copy_dir = tmp_path / "copy"
    shutil.copytree(result.directory, copy_dir)
    assert main(["verify", str(copy_dir)]) == 0
    out = capsys.readouterr().out
    outputs = sum(len(m.outputs) for m in result.manifest.modes.values())
    formats = len(result.manifest.formats)
    rows = formats * (len(RETURNT_MODES) + outputs)  # per format: each file's flat params + each output
    assert f"{rows} passed, 0 failed" in out and "MISMATCH" not in out
    target = copy_dir / "full.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the weights
    target.write_bytes(bytes(data))
    assert main(["verify", str(copy_dir)]) == 1
    assert "full.onnx: sha256 does not match manifest.json" in capsys.readouterr().err
    (copy_dir / "manifest.json").unlink()
    assert main(["verify", str(copy_dir)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("name", backbone_params("mnistmlp"))
def test_verify_onnx_only_directory(name, export, tmp_path, capsys):
    """Without TorchScript files the eager reference is rebuilt from the ONNX parameters."""
    _, result = export
    d = tmp_path / "onnx-only"
    d.mkdir()
    manifest = json.loads((result.directory / "manifest.json").read_text())
    for mode in RETURNT_MODES:
        shutil.copy(result.directory / f"{mode}.onnx", d)
        manifest["files"].pop(f"{mode}.pt")
        manifest["files"].pop(f"{mode}.ep.pt2")
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert main(["quantize", str(d), "--modes", "out", "--calibration", "random"]) == 0
    assert main(["verify", str(d)]) == 0
    outputs = sum(len(m["outputs"]) for m in manifest["modes"].values())
    assert f"{len(RETURNT_MODES) + outputs} passed, 0 failed" in capsys.readouterr().out
    manifest["backbone"]["name"] = "not-a-backbone"
    (d / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(d)]) == 1
    assert "'not-a-backbone' is not registered" in capsys.readouterr().err
