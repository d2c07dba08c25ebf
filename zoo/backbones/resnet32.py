"""Mammoth's iCaRL ResNet-32 (`backbone/ResNet32.py`), quirks that shape checkpoints kept.

conv -> ReLU -> BN ordering, BN eps 1e-4, zero-padded strided shortcut, no ReLU after the very
last block, a fixed 8x8 average pool (32x32 inputs only) and a `bn_final` that forward never
uses but that is in the state_dict and in `get_params()`.
"""


import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone

EPS_BATCH_NORM = 1e-4


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IdentityShortcut(nn.Module):
    """Subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad_dimension = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.pad_dimension, self.pad_dimension))


class BasicBlock32(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, last: bool = False) -> None:
        super().__init__()
        self.last = last
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, eps=EPS_BATCH_NORM)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=EPS_BATCH_NORM)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(F.relu(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        residual = x
        if self.downsample is not None:
            residual = self.downsample(x)
        out = out + residual
        if not self.last:
            out = F.relu(out)
        return out


class ResNet32(MammothBackbone):
    def __init__(self, depth: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"resnet32 depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.input_shape = (3, 32, 32)
        self.dynamic_hw = False  # AvgPool2d(8) is only a global pool on 32x32 inputs
        self.inplanes = 16
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, padding=1, bias=False)
        self.bn_initial = nn.BatchNorm2d(16, eps=EPS_BATCH_NORM)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2, last=True)
        self.bn_final = nn.BatchNorm2d(64, eps=EPS_BATCH_NORM)  # unused by forward (Mammoth)
        self.avgpool = nn.AvgPool2d(8)
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        self.stages = (Stage("stem", 16), Stage("layer1", 16), Stage("layer2", 32), Stage("layer3", 64))
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, last: bool = False) -> nn.Sequential:
        downsample = IdentityShortcut(planes) if stride != 1 else None
        layers = [BasicBlock32(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        for i in range(1, blocks):
            layers.append(BasicBlock32(planes, planes, last=last and i == blocks - 1))
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        gain = math.sqrt(2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.kernel_size[0] * m.kernel_size[1] * m.in_channels
                nn.init.normal_(m.weight, 0, gain * math.sqrt(1.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier.weight, 0, math.sqrt(1.0 / 64))
        nn.init.zeros_(self.classifier.bias)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        out_0 = self.bn_initial(F.relu(self.conv1(x)))
        out_1 = self.layer1(out_0)
        out_2 = self.layer2(out_1)
        out_3 = self.layer3(out_2)
        return [out_0, out_1, out_2, out_3]

    def forward_pool(self, last: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(last), 1)

    def forward_head(self, features: Tensor) -> Tensor:
        return self.classifier(features)


@register_backbone("resnet32")
def resnet32(num_classes: int, depth: int = 32) -> ResNet32:
    """iCaRL's ResNet-32 for 32x32 inputs."""
    return ResNet32(depth=depth, num_classes=num_classes)
