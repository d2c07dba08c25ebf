"""The slowest tests: every registered backbone at full size, and torchvision's ViT-B. In a
file that sorts first, so the two workers start them early instead of one finishing alone."""

import pytest
import torch

from export.formats.onnx import ort_session
from export.formats.torchscript import load_torchscript
from tests.conftest import assert_within_bound
from tests.test_export_cli import run
from zoo.registry import REGISTRY


@pytest.mark.slow
def test_all_registered_backbones_export(capsys, tmp_path):
    """`--all` at full size, as TorchScript (44 s here; as ONNX 206 s): every backbone's ONNX
    export is tested at small size elsewhere, and ViT-B's at full size below. timm's backbones
    have no TorchScript: listed as skipped."""
    code, out, err = run(capsys, "--all", "--out", tmp_path, "--modes", "out", "--formats", "torchscript")
    assert code == 0, out + err
    unscriptable = [n for n in REGISTRY.names() if "torchscript" in REGISTRY.entry(n).unsupported_formats]
    assert f"{len(REGISTRY.names()) - len(unscriptable)} exported, 0 failed, {len(unscriptable)} skipped" in out
    for name in unscriptable:  # timm's: each listed, with why; at full size in test_timm.py
        assert "skipped: no torchscript: timm's forward_intermediates does not script" in out.split(name, 1)[1]


@pytest.mark.slow
def test_torchvision_vit_family(tmp_path):
    """torchvision's ViT through the adapter: ViT-B/16 (its smallest registered member) at full
    size as TorchScript, and torchvision's VisionTransformer class at a small size in ONNX and as
    a program (the same graph with fewer, narrower layers: converting ViT-B to ONNX alone takes
    ~25 s here). 'full' alone, as its last output is 'out' and the heads are tested for every
    mode at small size."""
    from torchvision.models.vision_transformer import VisionTransformer

    from export.formats.onnx import read_onnx_params
    from export.pipeline.build import export_backbone
    from zoo import get_backbone
    from zoo.backbones.torchvision_adapter import TorchvisionBackbone

    net = get_backbone("tv", model="vit_b_16").eval()
    result = export_backbone(net, tmp_path / "vit", modes=["full"], formats=["torchscript"])
    assert result.ok, result.failures
    # 12 encoder layers, the final norm, features, logits
    assert len(result.manifest.output_names("full")) == 12 + 1 + 2
    assert torch.equal(load_torchscript(result.directory / "full.pt").get_params(), net.get_params())

    torch.manual_seed(0)
    small = TorchvisionBackbone(VisionTransformer(image_size=224, patch_size=32, num_layers=3, num_heads=2,
                                                  hidden_dim=32, mlp_dim=64, num_classes=10)).eval()
    result = export_backbone(small, tmp_path / "small-vit", modes=["full"], formats=["onnx", "exported"])
    assert result.ok, result.failures
    names = result.manifest.output_names("full")
    assert len(names) == 3 + 1 + 2
    x = torch.randn(2, 3, 224, 224)
    got = ort_session(result.directory / "full.onnx").run(names, {"x": x.numpy()})
    with torch.no_grad():
        want = small(x, returnt="full")
    for g, w in zip(got, want):
        assert_within_bound(g, w.numpy())
    assert torch.equal(read_onnx_params(result.directory / "full.onnx"), small.get_params())
