"""Random weights that keep activations at unit scale, so comparing an export with eager means
something.

Freshly initialised networks carry BatchNorm running statistics of mean 0 and variance 1 that
have nothing to do with their activations: through a deep network, eval-mode outputs drift to
~1e-12 (EfficientNet features) or ~1e-9 (MobileNetV3 logits), or blow up. Setting the running
statistics from a forward pass on the example distribution (seeded N(0,1) images) makes every
BatchNorm output roughly unit scale, as a trained network's are.
"""

from typing import Sequence

import torch
from torch import nn


def set_unit_scale(net: nn.Module, input_shape: Sequence[int], seed: int = 0, batch: int = 8) -> None:
    """Set every BatchNorm's running mean/var to the statistics of one forward pass on `batch`
    seeded N(0,1) inputs of `input_shape` (C,H,W). Parameters are untouched; a network without
    BatchNorm is left as it is."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    device = next(net.parameters()).device
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    was_training = net.training
    net.train()
    try:
        with torch.no_grad():
            net(x)
    finally:
        net.train(was_training)
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
