"""Parameter counts (the papers' figures) and output shapes of every registered model."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from models import MODELS, AlexNet, LeNet5, LeNet300, VGG16, VGG16CIFAR


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_lenet300_has_papers_parameter_count() -> None:
    # 784*300+300 + 300*100+100 + 100*10+10 (Han 2015 Table 1: 267K)
    assert n_params(LeNet300()) == 266_610


def test_lenet5_caffe_form_has_papers_parameter_count() -> None:
    # conv 1->20 5x5 (520) + conv 20->50 5x5 (25,050) + fc 800->500 (400,500) + fc 500->10 (5,010)
    assert n_params(LeNet5()) == 431_080


def test_alexnet_is_the_grouped_caffe_network() -> None:
    # BVLC AlexNet: 60,965,224 parameters (Deep Compression Table 4: 61M); conv2 has 256*48*25 weights.
    with torch.device("meta"):
        model = AlexNet()
    assert n_params(model) == 60_965_224
    assert model.features.conv2.weight.numel() == 307_200


def test_vgg16_imagenet_parameter_count() -> None:
    with torch.device("meta"):  # counted without allocating its 552 MB (the one real VGG-16 is built below)
        assert n_params(VGG16()) == 138_357_544  # torchvision's vgg16 and the paper's 138M


@pytest.mark.parametrize(("build", "shape", "classes"), [  # built in the test, not at collection
    (LeNet300, (2, 1, 28, 28), 10),
    (LeNet5, (2, 1, 28, 28), 10),
    (lambda: LeNet5(num_classes=100, in_channels=3, input_size=32), (2, 3, 32, 32), 100),
    (lambda: AlexNet(num_classes=10), (2, 3, 224, 224), 10),
    (lambda: VGG16CIFAR(num_classes=100), (2, 3, 32, 32), 100),
])
def test_output_shapes(build: Any, shape: tuple[int, ...], classes: int) -> None:
    model = build().eval()
    with torch.no_grad():
        assert model(torch.randn(*shape)).shape == (shape[0], classes)


def test_vgg16_imagenet_output_shape() -> None:
    model = VGG16(num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_dropout_is_an_argument() -> None:
    model = AlexNet(num_classes=10, dropout=0.3)
    assert model.classifier.drop6.p == 0.3 and model.classifier.drop7.p == 0.3


@pytest.mark.parametrize("name", list(MODELS))
def test_bad_num_classes_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MODELS[name](num_classes=0)
