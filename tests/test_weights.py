"""Checkpoint loading: strict with listed keys, weights-only, safetensors, torchvision layout."""

import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import REPO
from zoo import get_backbone
from zoo.weights import CheckpointError, UnsafeCheckpointError, load_file, load_state_dict_strict


@pytest.fixture
def net():
    return get_backbone("resnet18", num_filters=8)


def test_missing_unexpected_misshaped_keys_listed(net):
    sd = net.state_dict()
    sd.pop("conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    sd["classifier.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(net, sd)
    msg = str(info.value)
    assert "\n" not in msg
    assert "missing keys (1): conv1.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg
    assert "mis-shaped keys (1): classifier.weight (3, 3) != (10, 64)" in msg


def test_non_weights_only_pickle_refused(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"args": Namespace(a=1), "state_dict": {}}, path)
    with pytest.raises(UnsafeCheckpointError, match="not a weights-only pickle.*--allow-unsafe-pickle"):
        load_file(path)
    assert isinstance(load_file(path, allow_unsafe_pickle=True)["args"], Namespace)


def test_corrupt_and_missing_files(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt"):
        load_file(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_file(tmp_path / "nope.pt")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_file(bad_st)


def test_safetensors_and_pt_roundtrip(net, tmp_path):
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        other = get_backbone("resnet18", num_filters=8)
        load_state_dict_strict(other, load_file(tmp_path / name))
        assert torch.equal(other.get_params(), net.get_params())


def test_torchvision_weights_file_resnet18_7x7(tmp_path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    net = get_backbone("resnet18-7x7-pt", num_classes=5, weights=str(tmp_path / "r18.pth"))
    assert torch.equal(net.layer2[0].shortcut[0].weight, tv.layer2[0].downsample[0].weight)
    assert torch.equal(net.conv1.weight, tv.conv1.weight)
    assert net.classifier.weight.shape == (5, 512)
    # same architecture as torchvision: identical features
    tv.eval(), net.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        body = torch.nn.Sequential(*list(tv.children())[:-1])
        torch.testing.assert_close(net(x, returnt="features"), body(x).flatten(1))


@pytest.mark.slow
def test_torchvision_weights_file_resnet50(tmp_path):
    import torchvision

    tv = torchvision.models.resnet50(weights=None)
    torch.save(tv.state_dict(), tmp_path / "r50.pth")
    net = get_backbone("resnet50-pt", weights=str(tmp_path / "r50.pth"))
    assert torch.equal(net.layer1[0].downsample[1].running_var, tv.layer1[0].downsample[1].running_var)


def test_wrong_weights_file_lists_keys(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet34(weights=None).state_dict(), tmp_path / "r34.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(.*layer1.2"):
        get_backbone("resnet18-7x7-pt", weights=str(tmp_path / "r34.pth"))


def test_pretrained_without_file_warns_once():
    with pytest.warns(UserWarning, match="no local weights file given.*--weights PATH"):
        get_backbone("resnet18-7x7-pt")


def test_zoo_list_cli_shows_every_backbone():
    proc = subprocess.run([sys.executable, "-m", "zoo", "list"], capture_output=True, text=True,
                          cwd=REPO, check=True)
    from zoo import list_backbones

    for name in list_backbones():
        assert f"\n{name}  (" in "\n" + proc.stdout
    assert "depth: int (required)" in proc.stdout
    assert "params: 11,173,962" in proc.stdout


def test_zoo_list_unknown_pattern():
    proc = subprocess.run([sys.executable, "-m", "zoo", "list", "nothing*"], capture_output=True,
                          text=True, cwd=REPO)
    assert proc.returncode == 2 and "no backbone matches" in proc.stderr


def test_unknown_efficientnet_type_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'efficientnet_type' must be one of \['b0', 'b1'.*'l2'\], got 'b9'"):
        get_backbone("efficientnet", efficientnet_type="b9")


def test_torchvision_name_without_classifier_or_unknown():
    with pytest.raises(ValueError, match="'fcn_resnet50' is not a torchvision classification model"):
        get_backbone("tv", model="fcn_resnet50")
    with pytest.raises(ValueError, match="did you mean: resnet18"):
        get_backbone("tv", model="resnet81")


def test_weights_file_for_another_architecture(tmp_path):
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"does not fit backbone 'MobileNetV3'|missing keys \(\d+\): features"):
        get_backbone("tv-mobilenet-v3-small", weights=str(tmp_path / "r18.pth"))
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): _conv_stem.weight"):
        get_backbone("efficientnet", efficientnet_type="b0", weights=str(tmp_path / "r18.pth"))


def test_torchvision_weights_file_for_tv_backbone(tmp_path):
    import torchvision

    tv = torchvision.models.mobilenet_v3_small(weights=None, num_classes=10)
    torch.save(tv.state_dict(), tmp_path / "m.pth")
    net = get_backbone("tv-mobilenet-v3-small", weights=str(tmp_path / "m.pth")).eval()
    tv.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), tv(x))
