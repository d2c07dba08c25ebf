"""`--onnx-weights shared`: one weights.onnx.data for every mode's graph, rewritten in place."""

import json

import numpy as np
import onnx
import pytest
import torch

from export.cli import main
from export.errors import IntegrityError
from export.formats.onnx import read_onnx_params
from export.formats.torchscript import load_torchscript
from export.pipeline.build import export_backbone
from export.runtime import OnnxBackbone
from export.store.manifest import SHARED_WEIGHTS
from tests.conftest import assert_within_bound, build_small
from zoo import RETURNT_MODES

pytestmark = pytest.mark.xdist_group("shared-weights")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    net, shape = build_small("resnet18")
    root = tmp_path_factory.mktemp("shared")
    result = export_backbone(net, root / "r", input_shape=shape, onnx_weights="shared")
    assert result.ok, result.failures
    return net, result


def test_weights_are_stored_once(shared):
    net, result = shared
    d, m = result.directory, result.manifest
    assert m.onnx_weights == "shared" and SHARED_WEIGHTS in m.files
    data = (d / SHARED_WEIGHTS).stat().st_size
    assert data == 4 * net.num_params()
    for mode in RETURNT_MODES:
        graph = onnx.load(str(d / f"{mode}.onnx"), load_external_data=False)
        external = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert {e.onnx_name for e in m.flat_params.layout} <= external
        assert (d / f"{mode}.onnx").stat().st_size < data / 2
        assert torch.equal(read_onnx_params(d / f"{mode}.onnx", m), net.get_params())


def test_runtime_and_verify_read_shared_weights(shared, tmp_path):
    net, result = shared
    onnx_net = OnnxBackbone(result.directory)
    x = torch.randn(2, *onnx_net.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = net(x, returnt="full")
    for g, w in zip(onnx_net(x, returnt="full"), want):
        assert_within_bound(g.numpy(), w.numpy())
    assert torch.equal(onnx_net.get_params(), net.get_params())
    onnx_net.set_params(net.get_params() * 0.5)
    assert not np.allclose(onnx_net(x).numpy(), want[-1].numpy())
    assert main(["verify", str(result.directory)]) == 0


def test_tampered_shared_weights_are_refused(shared, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(shared[1].directory, d)
    data = bytearray((d / SHARED_WEIGHTS).read_bytes())
    data[100] ^= 1
    (d / SHARED_WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="weights.onnx.data: sha256 does not match"):
        OnnxBackbone(d)


def test_params_write_rewrites_the_directory_in_place(shared, tmp_path, capsys):
    import copy
    import shutil

    net, result = shared
    d = tmp_path / "copy"
    shutil.copytree(result.directory, d)
    assert main(["quantize", str(d), "--modes", "out", "--calibration", "random"]) == 0
    new = net.get_params() * (1 + 0.05 * torch.randn(net.num_params(), generator=torch.Generator().manual_seed(2)))
    torch.save(new, tmp_path / "v.pt")
    assert main(["params", "write", str(d), str(tmp_path / "v.pt")]) == 0
    manifest = json.loads((d / "manifest.json").read_text())
    assert "out.int8.onnx" not in manifest["files"] and not (d / "out.int8.onnx").exists()
    assert torch.equal(OnnxBackbone(d).get_params(), new)
    assert torch.equal(load_torchscript(d / "both.pt").get_params(), new)
    changed = copy.deepcopy(net)
    changed.set_params(new)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = changed(x, returnt="both")
    for g, w in zip(OnnxBackbone(d)(x, returnt="both"), want):
        assert_within_bound(g.numpy(), w.numpy())
    assert main(["verify", str(d)]) == 0
    capsys.readouterr()
    assert main(["params", "write", str(d), str(tmp_path / "v.pt"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "rewritten in place, --out does not apply" in capsys.readouterr().err


def test_embedded_directories_are_not_rewritten(tmp_path, capsys):
    assert main(["mnistmlp", "--mlp_hidden_size", "4", "--out", str(tmp_path), "--formats", "onnx"]) == 0
    count = OnnxBackbone(tmp_path / "mnistmlp-mlp_hidden_size4").get_params().numel()
    torch.save(torch.zeros(count), tmp_path / "z.pt")
    capsys.readouterr()
    assert main(["params", "write", str(tmp_path / "mnistmlp-mlp_hidden_size4"), str(tmp_path / "z.pt")]) == 2
    assert "hold their own weights (exported without --onnx-weights shared)" in capsys.readouterr().err


def test_models_over_two_gib_are_exported_shared(tmp_path, capsys, monkeypatch):
    """A self-contained ONNX file cannot hold 2 GiB: such models switch to shared weights."""
    monkeypatch.setattr("export.formats.onnx.ONNX_SINGLE_FILE_LIMIT", 1000)
    assert main(["mnistmlp", "--mlp_hidden_size", "4", "--out", str(tmp_path), "--modes", "out,full"]) == 0
    manifest = json.loads((tmp_path / "mnistmlp-mlp_hidden_size4" / "manifest.json").read_text())
    assert manifest["onnx_weights"] == "shared" and SHARED_WEIGHTS in manifest["files"]
    assert main(["verify", str(tmp_path / "mnistmlp-mlp_hidden_size4")]) == 0
