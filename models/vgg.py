"""VGG-16 (Simonyan & Zisserman 2014, configuration D), compressed 49x by Deep Compression (Table 5).

Two forms share the convolutional ``features``:
- ``VGG16``: the ImageNet network (224 px input, fc6 25088 -> 4096 -> 4096 -> classes; 138,357,544
  parameters for 1000 classes), the one in the paper.
- ``VGG16CIFAR``: the 32 px form for CIFAR (a 1x1 map after five pools, classifier 512 -> 512 -> classes),
  with batch norm optional since plain VGG-16 trains poorly from scratch on CIFAR.
Layers are named ``conv1_1``...``conv5_3``, ``fc6``...``fc8`` as in the paper's tables.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

# Output channels per conv layer, "M" for a 2x2 max-pool (torchvision's cfg "D").
cfgs: dict[str, list[int | str]] = {"D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                          512, 512, 512, "M", 512, 512, 512, "M"]}


def make_features(cfg: list[int | str], batch_norm: bool) -> nn.Sequential:
    """Builds the convolutional trunk with paper-style layer names (conv<block>_<index>)."""
    layers: list[tuple[str, nn.Module]] = []
    in_channels, block, index = 3, 1, 1
    for v in cfg:
        if v == "M":
            layers.append((f"pool{block}", nn.MaxPool2d(kernel_size=2, stride=2)))
            block, index = block + 1, 1
            continue
        name = f"{block}_{index}"
        layers.append((f"conv{name}", nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1)))
        if batch_norm:
            layers.append((f"bn{name}", nn.BatchNorm2d(int(v))))
        layers.append((f"relu{name}", nn.ReLU(inplace=True)))
        in_channels, index = int(v), index + 1
    return nn.Sequential(OrderedDict(layers))


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _check(num_classes: int, dropout: float) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class VGG16(nn.Module):
    """ImageNet VGG-16.

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability before fc6 and fc7.
        batch_norm: Insert BatchNorm after every conv (VGG-16-BN).
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5, batch_norm: bool = False) -> None:
        super().__init__()
        _check(num_classes, dropout)
        self.features = make_features(cfgs["D"], batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(OrderedDict([
            ("drop6", nn.Dropout(dropout)),
            ("fc6", nn.Linear(512 * 7 * 7, 4096)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc8", nn.Linear(4096, num_classes)),
        ]))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, 7, 7) for 224 px input
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # (N, 25088)
        return self.classifier(x)


class VGG16CIFAR(nn.Module):
    """VGG-16 for 32 px inputs (CIFAR-10/100).

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability before fc6 and fc7.
        batch_norm: Insert BatchNorm after every conv (recommended from scratch).
    """

    def __init__(self, num_classes: int = 100, dropout: float = 0.5, batch_norm: bool = True) -> None:
        super().__init__()
        _check(num_classes, dropout)
        self.features = make_features(cfgs["D"], batch_norm)
        self.classifier = nn.Sequential(OrderedDict([
            ("drop6", nn.Dropout(dropout)),
            ("fc6", nn.Linear(512, 512)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc7", nn.Linear(512, 512)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc8", nn.Linear(512, num_classes)),
        ]))
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 512, 1, 1) for 32 px input
        x = torch.flatten(x, 1)  # (N, 512)
        return self.classifier(x)
