"""Reference outputs produced by running Mammoth's own code (tests/data/vectors, and the two
large files from ../shared/vectors where it exists)."""

import pytest
import torch

from tests.conftest import LARGE_VECTORS, load_vector, vector_files
from zoo import get_backbone, list_backbones
from zoo.backbones.resnet import BasicBlock, ResNet
from zoo.backbones.vit import VisionTransformer

FILES = vector_files()


def _tol(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def build_for_vector(data):
    """Our backbone for a vector file: the registered factory, or the file's direct build."""
    name, kwargs = data["backbone"], dict(data["kwargs"])
    if "built_via" in data and name == "resnet18-spr":  # the SPR code path at nf=8
        return ResNet(BasicBlock, [2, 2, 2, 2], kwargs["num_classes"], kwargs["nf"], stem="imagenet")
    if "built_via" in data and name == "vit":  # timm's builder at tiny dimensions
        return VisionTransformer(**kwargs)
    assert name in list_backbones(), f"vector file for {name!r}, which is not registered"
    return get_backbone(name, **kwargs)


def test_vectors_are_present():
    names = {p.values[0].name for p in FILES}
    assert {"mnistmlp.pt", "resnet18.pt", "resnet32.pt", "resnet34.pt", "preact-resnet18.pt",
            "resnet18-spr-arch_nf8.pt", "vit-tiny_p8_32px.pt", *LARGE_VECTORS} <= names


@pytest.mark.parametrize("path", FILES)
def test_reproduces_mammoth(path):
    data = load_vector(path)
    net = build_for_vector(data)
    net.load_state_dict(data["state_dict"], strict=True)
    net.eval()
    assert [n for n, _ in net.named_parameters()] == list(data["param_names_in_order"])
    assert torch.equal(net.get_params(), data["flat_params"])
    x = data["x"]
    with torch.no_grad():
        _tol(net(x), data["out"])
        _tol(net(x, returnt="features"), data["features"])
        ours = net(x, returnt="full")
        if data["both"]:
            both = net(x, returnt="both")
            _tol(both[0], data["both"][0])
            _tol(both[1], data["both"][1])
    _tol(ours[-1], data["out"])
    _tol(ours[-2], data["features"])
    structure = data["full_structure"]
    if structure.startswith("tuple(logits, list["):  # Mammoth's stages = our outs[:-2]
        mammoth_stages = data["full"][1:]
        assert len(mammoth_stages) == len(ours) - 2
        for got, want in zip(ours[:-2], mammoth_stages):
            _tol(got, want)
