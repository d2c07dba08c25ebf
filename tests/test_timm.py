"""timm backbones: by name, the curated entries at full size (each family once), timm's data
config as the manifest's preprocessing, local weights files, and what they are not exported to.
Every `timm-*` entry x mode x format is tested at small size with the rest of the registry."""

import json

import pytest
import torch
from torch import nn

from export.pipeline.build import export_backbone
from export.store.tolerance import sample_inputs
from tests.conftest import assert_within_bound
from tests.test_export_cli import run
from zoo import get_backbone
from zoo.backbones.timm_adapter import CURATED, TimmBackbone, intermediate_families
from zoo.weights import CheckpointError

timm = pytest.importorskip("timm", reason="the timm extra is not installed (make install installs it)")

#: one registered entry per model class: the three ViTs share VisionTransformer
FAMILIES = ["timm-vit-base-patch16-224", "timm-convnext-tiny", "timm-efficientnet-b0",
            "timm-mobilenetv3-large-100", "timm-regnetx-002", "timm-resnet50"]


def test_curated_entries_cover_every_class():
    """The full-size list below leaves out only entries whose timm class it already has."""
    classes = {n: type(timm.create_model(m, pretrained=False, num_classes=1)).__name__ for n, m in CURATED.items()}
    assert {classes[n] for n in FAMILIES} == set(classes.values())
    assert len(CURATED) >= 8


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_family_at_full_size(name, tmp_path):
    """Random weights at timm's default size: 'full' as a torch.export program, verified against
    eager (the small configurations test every mode and format); stages from feature_info."""
    torch.manual_seed(0)
    net = get_backbone(name)
    result = export_backbone(net, tmp_path / name, modes=["full"], formats=["exported"])
    assert result.ok, result.failures
    m = result.manifest
    info = net.model.feature_info
    assert [o.module for o in m.modes["full"].outputs[:-2]] == [f["module"] for f in info]
    assert [o.shape[1] for o in m.modes["full"].outputs[:-2]] == [f["num_chs"] for f in info]
    cfg = timm.data.resolve_model_data_config(net.model)
    prep = m.preprocessing
    assert list(prep["mean"]) == list(cfg["mean"]) and list(prep["std"]) == list(cfg["std"])
    assert list(prep["input_size"]) == list(cfg["input_size"][1:]) and m.input.shape[1:] == list(cfg["input_size"])
    assert prep["interpolation"] == cfg["interpolation"] and prep["crop_pct"] == cfg["crop_pct"]
    assert not prep["baked"]
    assert ("height" in m.input.dynamic) == ("vit" not in name)


def test_model_by_name(capsys, tmp_path):
    """`timm --model NAME` for a model the registry has no entry for; no TorchScript, said once."""
    code, out, err = run(capsys, "timm", "--model", "test_byobnet", "--input-shape", "3,64,64",
                         "--modes", "out,full", "--out", tmp_path)
    assert code == 0, out + err
    assert "note: no torchscript file for timm: timm's forward_intermediates does not script" in err
    m = json.loads((tmp_path / "timm-modeltest_byobnet" / "manifest.json").read_text())
    assert m["formats"] == ["onnx", "exported"] and m["backbone"]["args"]["model"] == "test_byobnet"
    assert not list((tmp_path / "timm-modeltest_byobnet").glob("*.pt"))


@pytest.mark.parametrize("argv, message", [
    (["timm", "--model", "vit_base_patch16_22"], "'vit_base_patch16_22' is not a timm model; did you mean: "
                                                 "vit_base_patch16_224"),
    (["timm-resnet50", "--formats", "onnx,torchscript"],
     "backbone 'timm-resnet50' is not exported as torchscript: timm's forward_intermediates does not script"),
])
def test_bad_timm_requests_are_one_line(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, "--out", tmp_path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


def test_a_model_without_forward_intermediates_is_refused(monkeypatch):
    """Every class of timm 1.0.31 has forward_intermediates; a model registered without it
    (an older or third-party one) is refused naming the families that work."""
    from timm.models import _registry

    class Plain(nn.Module):
        def forward(self, x):
            return x

    monkeypatch.setitem(_registry._model_entrypoints, "plain_test_model", lambda pretrained=False, **kw: Plain())
    monkeypatch.setitem(_registry._model_to_module, "plain_test_model", "resnet")
    with pytest.raises(ValueError, match=r"'plain_test_model' \(Plain, .*\) has no forward_intermediates; "
                                         r"timm --model takes models of: .*vision_transformer"):
        get_backbone("timm", model="plain_test_model")
    assert {"vision_transformer", "convnext", "efficientnet", "resnet"} <= set(intermediate_families())


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file(tmp_path, suffix):
    """A timm checkpoint from disk (never a download): strict, its classifier kept when the
    shapes fit, else the new classes' own; a wrapped training checkpoint is unwrapped."""
    torch.manual_seed(3)
    source = timm.create_model("test_resnet", pretrained=False, num_classes=1000)
    state = source.state_dict()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    same = get_backbone("timm", model="test_resnet", num_classes=1000, weights=str(path))
    assert torch.equal(same.get_params(), torch.cat([p.detach().reshape(-1) for p in source.parameters()]))
    fewer = get_backbone("timm", model="test_resnet", num_classes=10, weights=str(path))
    body = [k for k in state if not k.startswith("fc.")]
    assert all(torch.equal(fewer.model.state_dict()[k], state[k]) for k in body)
    assert fewer.model.fc.out_features == 10
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_convnext", pretrained=False).state_dict(), other)
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'timm': missing keys \(\d+\): .*"
                                              r"unexpected keys"):
        get_backbone("timm", model="test_resnet", weights=str(other))


def test_baked_preprocessing_from_timm_data_config(tmp_path):
    """--bake-preprocessing without --mean/--std: the graph normalises with timm's mean/std."""
    torch.manual_seed(0)
    net = TimmBackbone(timm.create_model("test_efficientnet", pretrained=False, num_classes=10))
    from export.pipeline.build import default_preprocessing
    from export.pipeline.preprocessing import resolve

    prep = resolve(3, bake=True, default=default_preprocessing(net))
    assert prep.baked and prep.source == "timm data config of EfficientNet"
    result = export_backbone(net, tmp_path / "baked", modes=["out"], formats=["onnx"], input_shape=(3, 64, 64),
                             preprocessing=prep)
    assert result.ok, result.failures
    from export.runtime import load

    images = sample_inputs((3, 64, 64), images=True)[1]
    mean = torch.tensor(prep.mean).view(1, 3, 1, 1)
    std = torch.tensor(prep.std).view(1, 3, 1, 1)
    with torch.no_grad():
        want = net.eval()((images - mean) / std)
    assert_within_bound(load(tmp_path / "baked")(images).numpy(), want.numpy())
    with torch.no_grad():
        assert not torch.allclose(net(images), want, atol=1e-3)  # normalising matters here
