"""Models. Every model has a body `features(x) -> (n, d)` and a final linear layer `fc`
(`fc.weight` (C, d), `fc.bias` (C,)), the default influence scope. Imports only torch."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import BadInputError

MODELS = ("linear", "cnn", "resnet18")


class LinearModel(nn.Module):
    """Multinomial logistic regression on the flattened input."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallCNN(nn.Module):
    """Two conv blocks and a 128-unit hidden layer, for 28x28 inputs (MNIST, Fashion-MNIST)."""

    def __init__(self, in_channels: int, n_classes: int, hidden: int = 128):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)  # (n, 16, 28, 28) -> pool 14
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)  # (n, 32, 14, 14) -> pool 7
        self.fc1 = nn.Linear(32 * 7 * 7, hidden)
        self.fc = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return torch.relu(self.fc1(x.flatten(1)))  # (n, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 in its CIFAR form: a 3x3 stride-1 stem and no max-pool."""

    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        import torchvision

        body = torchvision.models.resnet18(num_classes=n_classes)
        body.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        body.maxpool = nn.Identity()
        body.fc = nn.Identity()
        self.body = body
        self.fc = nn.Linear(512, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (n, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(name: str, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised model for samples of `sample_shape`; the caller seeds torch."""
    if name == "linear":
        in_features = 1
        for size in sample_shape:
            in_features *= size
        return LinearModel(in_features, n_classes)
    if name in ("cnn", "resnet18"):
        if len(sample_shape) != 3:
            raise BadInputError(f"`model` {name} needs image samples (C, H, W), got shape {tuple(sample_shape)}")
        if name == "cnn":
            if tuple(sample_shape[1:]) != (28, 28):
                raise BadInputError(f"`model` cnn needs 28x28 images, got {tuple(sample_shape[1:])}; "
                                    "use resnet18 or linear")
            return SmallCNN(sample_shape[0], n_classes)
        return ResNet18(sample_shape[0], n_classes)
    raise BadInputError(f"`model` {name!r} is not a known model; valid: {', '.join(MODELS)}")


def inference_features(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """`model.features` for inference. On the CPU in float32, a traced, frozen TorchScript graph
    that oneDNN runs with prepacked, fused convolutions, several times faster than eager; it must
    match eager on `example` to float32 rounding, or eager mode is used. Elsewhere (CUDA, float64,
    `linear`) it is `model.features` itself."""
    model.eval()
    if (isinstance(model, LinearModel) or example.device.type != "cpu" or example.dtype != torch.float32
            or len(example) == 0):
        return model.features

    class _Features(nn.Module):
        def __init__(self, body: nn.Module):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body.features(x)

    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.compile, which is slower here
            # check_trace off: its own check (the trace run again and compared through torch.testing,
            # which imports torch.distributed) slows every worker's feature pass
            # (benchmarks/results/test-suite.md); the comparison with eager below is the check that counts
            traced = torch.jit.trace(_Features(model).eval(), example, check_trace=False)
            graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            fast, eager = graph(example), model.features(example)
        if fast.shape == eager.shape and torch.allclose(fast, eager, rtol=1e-4,
                                                        atol=1e-5 * float(eager.abs().max()) + 1e-7):
            return graph
    except Exception:  # any failure to compile leaves the eager path, which is always right
        pass
    return model.features
