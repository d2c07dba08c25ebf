"""Importing this package registers every backbone family (registration by import)."""

from zoo.backbones import mlp, resnet, resnet32  # noqa: F401
