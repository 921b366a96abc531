"""AlexNet in the Caffe (BVLC) form compressed 35x by Deep Compression (arXiv 1510.00149 Table 4).

Unlike torchvision's single-GPU variant (64/192 channels), this is the original network: 96-256-384-384-256
channels with grouped conv2/conv4/conv5 and local response normalisation, 60,965,224 parameters for 1000
classes. conv1 is padded by 2 so a 224 px crop gives the 6x6 map fc6 expects (padding adds no weights).
Dropout probability is an argument because pruning retrains with an adjusted rate (Han 2015 §3.5).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


class AlexNet(nn.Module):
    """Caffe AlexNet.

    Args:
        num_classes: Number of output classes.
        dropout: Dropout probability before fc6 and fc7.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2)),
            ("relu1", nn.ReLU(inplace=True)),
            ("norm1", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)),
            ("pool1", nn.MaxPool2d(kernel_size=3, stride=2)),
            ("conv2", nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)),
            ("relu2", nn.ReLU(inplace=True)),
            ("norm2", nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)),
            ("pool2", nn.MaxPool2d(kernel_size=3, stride=2)),
            ("conv3", nn.Conv2d(256, 384, kernel_size=3, padding=1)),
            ("relu3", nn.ReLU(inplace=True)),
            ("conv4", nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)),
            ("relu4", nn.ReLU(inplace=True)),
            ("conv5", nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)),
            ("relu5", nn.ReLU(inplace=True)),
            ("pool5", nn.MaxPool2d(kernel_size=3, stride=2)),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(OrderedDict([
            ("drop6", nn.Dropout(dropout)),
            ("fc6", nn.Linear(256 * 6 * 6, 4096)),
            ("relu6", nn.ReLU(inplace=True)),
            ("drop7", nn.Dropout(dropout)),
            ("fc7", nn.Linear(4096, 4096)),
            ("relu7", nn.ReLU(inplace=True)),
            ("fc8", nn.Linear(4096, num_classes)),
        ]))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.005)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 256, 6, 6) for 224 px input
        x = self.avgpool(x)
        x = torch.flatten(x, 1)  # (N, 9216)
        return self.classifier(x)
