"""Model registry: the names a config's ``arch.type`` may use."""

from __future__ import annotations

from torch import nn

from models.alexnet import AlexNet
from models.lenet import LeNet5, LeNet300
from models.vgg import VGG16, VGG16CIFAR

# Explicit registry: a config can only build what is listed here.
MODELS: dict[str, type[nn.Module]] = {
    "LeNet300": LeNet300,
    "LeNet5": LeNet5,
    "AlexNet": AlexNet,
    "VGG16": VGG16,
    "VGG16CIFAR": VGG16CIFAR,
}

__all__ = ["MODELS", "AlexNet", "LeNet300", "LeNet5", "VGG16", "VGG16CIFAR"]
