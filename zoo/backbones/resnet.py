"""Mammoth's ResNets (`backbone/ResNetBlock.py`, `backbone/ResNetBottleneck.py`), scriptable.

Same module names, registration order and therefore state_dict keys and `parameters()` order
as Mammoth. Blocks -> the model class -> public builders, top to bottom.
"""


from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone
from zoo.weights import load_pretrained, warn_random_weights


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def _projection(in_planes: int, out_planes: int, stride: int, with_bn: bool = True) -> nn.Sequential:
    """The 1x1 projection shortcut (empty Sequential = identity, as Mammoth does)."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    layers: List[nn.Module] = [conv1x1(in_planes, out_planes, stride)]
    if with_bn:
        layers.append(nn.BatchNorm2d(out_planes))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block (CNLL): BN before conv, conv-only shortcut, no final ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = _projection(in_planes, planes * self.expansion, stride, with_bn=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv); shortcut stored as `shortcut`."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self._add_shortcut(_projection(in_planes, planes * self.expansion, stride))

    def _add_shortcut(self, module: nn.Sequential) -> None:
        self.shortcut = module

    def _shortcut(self, x: Tensor) -> Tensor:
        return self.shortcut(x)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self._shortcut(x))


class TorchvisionBottleneck(Bottleneck):
    """Mammoth's `ResNetBottleneck` keeps torchvision's name for the shortcut: `downsample`."""

    def _add_shortcut(self, module: nn.Sequential) -> None:
        self.downsample = module

    def _shortcut(self, x: Tensor) -> Tensor:
        return self.downsample(x)


Block = Union[Type[BasicBlock], Type[PreActBlock], Type[Bottleneck]]


class ResNet(MammothBackbone):
    """Four-stage ResNet; `stem='cifar'` (3x3 conv) or `'imagenet'` (7x7/2 conv + maxpool)."""

    def __init__(
        self,
        block: Block,
        num_blocks: Sequence[int],
        num_classes: int,
        nf: int,
        stem: str = "cifar",
        input_shape: Tuple[int, int, int] = (3, 32, 32),
    ) -> None:
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"unknown stem {stem!r}; allowed: cifar, imagenet")
        self.input_shape = input_shape
        self.dynamic_hw = True
        self.in_planes = nf
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, nf, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, nf)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(nf)
        self.layer1 = self._make_layer(block, nf, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, nf * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, nf * 4, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, nf * 8, num_blocks[3], stride=2)
        self.feature_dim = nf * 8 * block.expansion
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        e = block.expansion
        self.stages = (
            Stage("stem", nf),
            Stage("layer1", nf * e),
            Stage("layer2", nf * 2 * e),
            Stage("layer3", nf * 4 * e),
            Stage("layer4", nf * 8 * e),
        )

    def _make_layer(self, block: Block, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        out_0 = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        out_1 = self.layer1(out_0)
        out_2 = self.layer2(out_1)
        out_3 = self.layer3(out_2)
        out_4 = self.layer4(out_3)
        return [out_0, out_1, out_2, out_3, out_4]

    def forward_pool(self, last: Tensor) -> Tensor:
        # Mammoth pools with a HxH window (== global mean on the square inputs it supports).
        return torch.flatten(F.adaptive_avg_pool2d(last, 1), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.classifier(features)


def _drop_fc(key: str) -> Optional[str]:
    """Mammoth drops torchvision's `fc` (its classifier is `classifier`)."""
    return None if key.startswith("fc.") else key


def _torchvision_basic_rename(key: str) -> Optional[str]:
    """Mammoth's renaming of torchvision ResNet-18 keys: `downsample`->`shortcut`, `fc` dropped."""
    if key.startswith("fc."):
        return None
    return key.replace("downsample", "shortcut")


def _with_weights(net: "ResNet", name: str, weights: str, pretrained: bool, source: str, rename) -> "ResNet":
    if weights:
        load_pretrained(net, weights, rename, name=name)
    elif pretrained:
        warn_random_weights(name, source)
    return net


@register_backbone("resnet18")
def resnet18(num_classes: int, num_filters: int = 64) -> ResNet:
    """CIFAR ResNet-18 (3x3 stem, no maxpool)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, num_filters)


@register_backbone("resnet34")
def resnet34(num_classes: int, num_filters: int = 64) -> ResNet:
    """CIFAR ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, num_filters)


@register_backbone("preact-resnet18")
def preact_resnet18(num_classes: int, num_filters: int = 64) -> ResNet:
    """Pre-activation ResNet-18 (CNLL); its stage outputs are pre-activation sums."""
    return ResNet(PreActBlock, [2, 2, 2, 2], num_classes, num_filters)


@register_backbone("reduced-resnet18")
def reduced_resnet18(num_classes: int) -> ResNet:
    """ResNet-18 with 20 filters, as in Gradient Episodic Memory."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, 20)


@register_backbone("resnet18-spr")
def resnet18_spr(num_classes: int) -> ResNet:
    """ResNet-18 with the 7x7 stride-2 stem and maxpool even at 32x32, as in SPR."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, 64, stem="imagenet")


@register_backbone("resnet18-7x7-pt")
def resnet18_7x7_pt(num_classes: int, weights: str = "") -> ResNet:
    """ResNet-18, ImageNet stem, from torchvision's ImageNet weights in a local file (`weights`)."""
    net = ResNet(BasicBlock, [2, 2, 2, 2], num_classes, 64, stem="imagenet", input_shape=(3, 224, 224))
    return _with_weights(
        net, "resnet18-7x7-pt", weights, True, "torchvision's resnet18 ImageNet weights",
        _torchvision_basic_rename,
    )


def _resnet50(name: str, num_classes: int, pretrained: bool, weights: str) -> ResNet:
    net = ResNet(TorchvisionBottleneck, [3, 4, 6, 3], num_classes, 64, stem="imagenet",
                 input_shape=(3, 224, 224))
    _init_like_torchvision(net)
    return _with_weights(net, name, weights, pretrained,
                         "torchvision's resnet50 ImageNet weights", _drop_fc)


@register_backbone("resnet50")
def resnet50(num_classes: int, pretrained: bool = False, weights: str = "") -> ResNet:
    """ImageNet ResNet-50 (torchvision layout, `downsample` keys); `pretrained` needs `weights`."""
    return _resnet50("resnet50", num_classes, pretrained, weights)


@register_backbone("resnet50-pt")
def resnet50_pt(num_classes: int, weights: str = "") -> ResNet:
    """ResNet-50 from torchvision's ImageNet weights in a local file (`weights`)."""
    return _resnet50("resnet50-pt", num_classes, True, weights)


_DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
           50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3]),
           152: (Bottleneck, [3, 8, 36, 3])}


@register_backbone("resnet", example={"depth": 18})
def resnet(depth: int, width: int = 1, num_classes: int = 10) -> ResNet:
    """Mammoth-style CIFAR ResNet of any standard depth; `num_filters = 64 * width`."""
    if depth not in _DEPTHS:
        raise ValueError(f"unsupported resnet depth {depth}; allowed: {', '.join(map(str, _DEPTHS))}")
    if width < 1:
        raise ValueError(f"resnet width must be >= 1, got {width}")
    block, blocks = _DEPTHS[depth]
    return ResNet(block, blocks, num_classes, 64 * width)


def _init_like_torchvision(net: nn.Module) -> None:
    """Mammoth's ResNetBottleneck init (kaiming fan_out for convs, BN to identity)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
