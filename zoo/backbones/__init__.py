"""Importing this package registers every backbone family (registration by import)."""

from zoo.backbones import efficientnet, mlp, resnet, resnet32, timm_adapter, torchvision_adapter, vit  # noqa: F401
