"""Model factories as a user writes them, `(sample_shape, n_classes) -> nn.Module`, named on the
command line as `tests.user_models:NAME` (`--model`): one that fits every scope, and the ones
each refusal is about."""

import torch
from torch import nn


class SmallNet(nn.Module):
    """A convolution, a pooled hidden layer and a final `head`; `scale`, a parameter of the
    network itself (not of a submodule), multiplies the input."""

    def __init__(self, sample_shape: tuple, n_classes: int):
        super().__init__()
        channels = sample_shape[0]
        self.scale = nn.Parameter(torch.ones(1))
        self.body = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten(), nn.Linear(6 * 2 * 2, 12), nn.Tanh())
        self.head = nn.Linear(12, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x * self.scale))


def make_net(sample_shape: tuple, n_classes: int) -> nn.Module:
    return SmallNet(sample_shape, n_classes)


def ends_in_softmax(sample_shape: tuple, n_classes: int) -> nn.Module:
    """Its output is the probabilities, not its last linear layer's output."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(sample_shape).prod()), n_classes), nn.Softmax(1))


def ends_in_conv(sample_shape: tuple, n_classes: int) -> nn.Module:
    """No linear layer at all: a 1x1 convolution to the classes, averaged over the image."""
    return nn.Sequential(nn.Conv2d(sample_shape[0], n_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def wrong_classes(sample_shape: tuple, n_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(sample_shape).prod()), n_classes + 1))


def flat_input(sample_shape: tuple, n_classes: int) -> nn.Module:
    """Made for flat samples: fails on images."""
    return nn.Linear(int(torch.tensor(sample_shape).prod()), n_classes)


def not_a_module(sample_shape: tuple, n_classes: int) -> list:
    return [nn.Linear(1, n_classes)]


def fails(sample_shape: tuple, n_classes: int) -> nn.Module:
    raise ValueError("no model for these samples")


NOT_CALLABLE = 3
