"""Small test configurations per backbone, and the one table of known exceptions.

A newly registered backbone is tested at once with its default arguments; add a row here only
to make it smaller/faster or to mark it slow.
"""

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Case:
    kwargs: Dict[str, Any] = field(default_factory=dict)
    input_shape: Optional[Tuple[int, ...]] = None  # None: the backbone's default input
    slow: bool = False
    build: Optional[Callable[[], Any]] = None  # a smaller direct build where args cannot shrink it


def _tiny_vit():
    from zoo.backbones.vit import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)


# The builders below keep each architecture's block types (bottlenecks, the ImageNet stem,
# squeeze-excitation, hard-swish, inverted residuals, ConvNeXt blocks) with fewer and narrower
# blocks: exporting a full-size ResNet-50 or ConvNeXt-T costs ~35 s per format set, and every
# registered backbone is exported at full size by test_all_registered_backbones_export.

def _small_resnet(block: str, layers):
    """8 filters, the ImageNet stem (7x7 conv, max-pool) of the registered variants."""
    from zoo.backbones import resnet

    net = resnet.ResNet(getattr(resnet, block), layers, 10, 8, stem="imagenet", input_shape=(3, 224, 224))
    if block == "TorchvisionBottleneck":
        resnet._init_like_torchvision(net)
    return net


def _small_efficientnet():
    from zoo.backbones.efficientnet import EfficientNet

    return EfficientNet("b0", 10, groups=[(1, 3, 1, 1, 32, 16, 0.25), (2, 3, 2, 6, 16, 24, 0.25),
                                          (1, 5, 2, 6, 24, 40, 0.25)])


def _small_torchvision(kind: str):
    """A torchvision model of the registered family's class, through the same adapter."""
    import torch
    from torchvision.models import convnext, efficientnet, mobilenetv3, resnet

    from zoo.backbones.torchvision_adapter import TorchvisionBackbone

    if kind == "resnet18":
        model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    elif kind.startswith("mobilenet_v3"):
        c = mobilenetv3.InvertedResidualConfig
        setting = ([c(16, 3, 16, 16, False, "RE", 1, 1, 1.0), c(16, 3, 64, 24, False, "RE", 2, 1, 1.0),
                    c(24, 3, 72, 24, False, "RE", 1, 1, 1.0), c(24, 5, 72, 40, True, "HS", 2, 1, 1.0)]
                   if kind == "mobilenet_v3_large" else
                   [c(16, 3, 16, 16, True, "RE", 2, 1, 1.0), c(16, 3, 72, 24, False, "RE", 2, 1, 1.0),
                    c(24, 5, 96, 24, True, "HS", 1, 1, 1.0)])
        model = mobilenetv3.MobileNetV3(setting, last_channel=128, num_classes=10)
    elif kind == "efficientnet_b0":
        c = efficientnet.MBConvConfig
        model = efficientnet.EfficientNet([c(1, 3, 1, 32, 16, 1), c(6, 3, 2, 16, 24, 2), c(6, 5, 2, 24, 40, 1)],
                                          dropout=0.2, num_classes=10)
    elif kind == "convnext_tiny":
        c = convnext.CNBlockConfig
        model = convnext.ConvNeXt([c(16, 32, 1), c(32, 64, 2), c(64, None, 1)], num_classes=10)
    else:
        raise ValueError(kind)
    for m in model.modules():  # torchvision's N(0, 0.01) suits full widths only: unit scale here
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    return TorchvisionBackbone(model)


def _small_timm(model: str, **kwargs):
    """A small timm model of the registered entry's class (timm's own `test_*` models where it
    has one), through the same adapter."""
    import timm

    from zoo.backbones.timm_adapter import TimmBackbone

    return TimmBackbone(timm.create_model(model, pretrained=False, num_classes=10, **kwargs))


def _small_timm_mobilenetv3():
    """timm's MobileNetV3 class with its block types (depthwise, inverted residual with and
    without hard-sigmoid squeeze-excitation, ReLU and hard-swish) in five short stages."""
    from functools import partial

    from timm.layers import get_act_layer
    from timm.models._efficientnet_blocks import SqueezeExcite
    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.mobilenetv3 import MobileNetV3
    from torch import nn

    from zoo.backbones.timm_adapter import TimmBackbone

    arch = [["ds_r1_k3_s1_e1_c16_nre"], ["ir_r1_k3_s2_e4_c24_nre"], ["ir_r1_k5_s2_e3_c40_se0.25_nre"],
            ["ir_r1_k3_s2_e6_c48_se0.25"], ["cn_r1_k1_s1_c96"]]
    se = partial(SqueezeExcite, gate_layer="hard_sigmoid", force_act_layer=nn.ReLU, rd_round_fn=round_channels)
    return TimmBackbone(MobileNetV3(block_args=decode_arch_def(arch), num_features=128, stem_size=16, fix_stem=True,
                                    act_layer=get_act_layer("hard_swish"), se_layer=se, num_classes=10))


def _small_timm_regnet():
    """timm's RegNet class (X blocks: grouped bottlenecks), one block per stage."""
    from timm.models.regnet import RegNet, RegNetCfg

    from zoo.backbones.timm_adapter import TimmBackbone

    return TimmBackbone(RegNet(RegNetCfg(w0=8, wa=36.44, wm=2.0, group_size=8, depth=4), num_classes=10))


CASES: Dict[str, Case] = {
    "resnet18": Case({"num_filters": 8}),
    "resnet34": Case({"num_filters": 8}),
    "preact-resnet18": Case({"num_filters": 8}),
    "reduced-resnet18": Case(),
    "resnet18-spr": Case(build=lambda: _small_resnet("BasicBlock", [2, 2, 2, 2]), input_shape=(3, 64, 64)),
    "resnet18-7x7-pt": Case(build=lambda: _small_resnet("BasicBlock", [1, 1, 1, 1]), input_shape=(3, 64, 64)),
    "resnet32": Case(),
    "resnet50": Case(build=lambda: _small_resnet("TorchvisionBottleneck", [1, 1, 1, 1]),
                     input_shape=(3, 64, 64)),
    "resnet50-pt": Case(build=lambda: _small_resnet("TorchvisionBottleneck", [1, 2, 1, 1]),
                        input_shape=(3, 64, 64)),
    "mnistmlp": Case({"mlp_hidden_size": 32}),
    "resnet": Case({"depth": 18}),
    "efficientnet": Case(build=_small_efficientnet, input_shape=(3, 32, 32)),
    "vit": Case(build=_tiny_vit),  # full size: test_all_registered_backbones_export (slow)
    "tv": Case({"model": "resnet18"}, input_shape=(3, 64, 64)),  # by name: the registry's path
    "tv-resnet18": Case(build=lambda: _small_torchvision("resnet18"), input_shape=(3, 64, 64)),
    "tv-mobilenet-v3-small": Case(build=lambda: _small_torchvision("mobilenet_v3_small"), input_shape=(3, 64, 64)),
    "tv-mobilenet-v3-large": Case(build=lambda: _small_torchvision("mobilenet_v3_large"), input_shape=(3, 64, 64)),
    "tv-efficientnet-b0": Case(build=lambda: _small_torchvision("efficientnet_b0"), input_shape=(3, 64, 64)),
    "tv-convnext-tiny": Case(build=lambda: _small_torchvision("convnext_tiny"), input_shape=(3, 64, 64)),
    # timm: full size in test_timm.py (each family once)
    "timm": Case({"model": "test_resnet"}, input_shape=(3, 64, 64)),  # by name: the registry's path
    # ViTs at timm's test size (160x160, 10x10 patches), fixed like the registered ones
    "timm-vit-base-patch16-224": Case(build=lambda: _small_timm("test_vit", dynamic_img_size=False)),
    "timm-vit-small-patch16-224": Case(build=lambda: _small_timm("test_vit2", dynamic_img_size=False, depth=3,
                                                                 init_values=1.0)),  # LayerScale 1e-5 hid weights
    "timm-deit-tiny-patch16-224": Case(build=lambda: _small_timm("test_vit", dynamic_img_size=False, depth=2,
                                                                 embed_dim=48, num_heads=3)),
    "timm-convnext-tiny": Case(build=lambda: _small_timm("test_convnext", depths=(1, 1, 1, 1)),
                               input_shape=(3, 64, 64)),
    "timm-efficientnet-b0": Case(build=lambda: _small_timm("test_efficientnet"), input_shape=(3, 64, 64)),
    "timm-mobilenetv3-large-100": Case(build=_small_timm_mobilenetv3, input_shape=(3, 64, 64)),
    "timm-regnetx-002": Case(build=_small_timm_regnet, input_shape=(3, 64, 64)),
    "timm-resnet50": Case(build=lambda: _small_timm("test_resnet"), input_shape=(3, 64, 64)),
}


def case_for(name: str) -> Case:
    return CASES.get(name, Case())


@dataclass(frozen=True)
class KnownException:
    """A backbone, mode or format the zoo promises but does not provide (yet), and why."""

    backbone: str
    reason: str
    mode: str = "*"
    format: str = "*"


KNOWN_EXCEPTIONS: list = []  # every promised backbone x mode x format is provided

#: every backbone name the zoo promises (Mammoth's registered names that exist outside PNN)
PROMISED_BACKBONES = (
    "resnet18", "resnet34", "preact-resnet18", "reduced-resnet18", "resnet18-spr",
    "resnet18-7x7-pt", "resnet32", "resnet50", "resnet50-pt", "mnistmlp", "efficientnet",
    "vit", "resnet",
)
