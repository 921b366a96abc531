"""LeNet-300-100 and LeNet-5 exactly as used by Han et al. (arXiv 1506.02626 Table 1, 1510.00149 Table 2).

Both follow the Caffe definitions the papers compressed:
- LeNet-300-100: fully connected 784 -> 300 -> 100 -> 10 with ReLU (266,610 parameters).
- LeNet-5: conv 20@5x5 -> max-pool -> conv 50@5x5 -> max-pool -> fc 800 -> 500 -> 10, with a single
  ReLU after fc1 as in Caffe's ``lenet_train_test.prototxt`` (431,080 parameters).

The layers carry the paper's names (``fc1``, ``conv1``...) so pruning and quantization configs can
address them; the models themselves know nothing about compression.
"""

from __future__ import annotations

import torch
from torch import nn


class LeNet300(nn.Module):
    """LeNet-300-100: a three-layer perceptron.

    Args:
        num_classes: Number of output classes.
        in_features: Flattened input size (784 for 28x28 MNIST images).
    """

    def __init__(self, num_classes: int = 10, in_features: int = 784) -> None:
        super().__init__()
        if num_classes < 1 or in_features < 1:
            raise ValueError(f"num_classes and in_features must be >= 1, got {num_classes}, {in_features}")
        self.fc1 = nn.Linear(in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)  # (N, C*H*W)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5 in Caffe's form (the one Han et al. compress 39x).

    Args:
        num_classes: Number of output classes.
        in_channels: Input channels (1 for MNIST, 3 for CIFAR).
        input_size: Input height/width in pixels (28 for MNIST, 32 for CIFAR).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 28) -> None:
        super().__init__()
        if num_classes < 1 or in_channels < 1:
            raise ValueError(f"num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
        side = ((input_size - 4) // 2 - 4) // 2  # two (conv 5x5 valid, pool 2) stages
        if side < 1:
            raise ValueError(f"input_size must be at least 16 pixels for LeNet5, got {input_size}")
        self.conv1 = nn.Conv2d(in_channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * side * side, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)  # (N, 20, 12, 12) for 28 px input
        x = nn.functional.max_pool2d(self.conv2(x), 2)  # (N, 50, 4, 4)
        x = torch.flatten(x, 1)  # (N, 800)
        x = torch.relu(self.fc1(x))
        return self.fc2(x)
