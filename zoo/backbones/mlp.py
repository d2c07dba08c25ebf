"""Mammoth's MNISTMLP (`backbone/MNISTMLP.py`): two hidden ReLU layers, Xavier init.

Mammoth registers every Linear under two or three names (`fc1` = `_features.0` = `net.0.0`,
`fc2` = `_features.2` = `net.0.2`, `classifier` = `net.1`), so its state_dict has 16 keys for
6 parameters. We keep the aliases so Mammoth checkpoints load with strict=True.
"""


from typing import List

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import MammothBackbone, Stage
from zoo.registry import register_backbone


class MNISTMLP(MammothBackbone):
    def __init__(self, input_size: int, output_size: int, hidden_size: int = 100,
                 input_shape: tuple = (1, 28, 28)) -> None:
        super().__init__()
        self.input_shape = input_shape
        self.dynamic_hw = False
        self.input_size = input_size
        self.fc1 = nn.Linear(input_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self._features = nn.Sequential(self.fc1, nn.ReLU(), self.fc2, nn.ReLU())
        self.classifier = nn.Linear(hidden_size, output_size)
        self.net = nn.Sequential(self._features, self.classifier)
        self.feature_dim = hidden_size
        self.stages = (Stage("hidden1", hidden_size), Stage("hidden2", hidden_size))
        for m in (self.fc1, self.fc2, self.classifier):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_stages(self, x: Tensor) -> List[Tensor]:
        x = x.reshape(x.shape[0], -1)
        h1 = F.relu(self.fc1(x))
        h2 = F.relu(self.fc2(h1))
        return [h1, h2]

    def forward_pool(self, last: Tensor) -> Tensor:
        return last

    def forward_head(self, features: Tensor) -> Tensor:
        return self.classifier(features)


@register_backbone("mnistmlp")
def mnistmlp(num_classes: int, mlp_hidden_size: int = 100) -> MNISTMLP:
    """MLP for 1x28x28 inputs (flattened to 784)."""
    return MNISTMLP(28 * 28, num_classes, hidden_size=mlp_hidden_size)
