"""Models. Every model has a body `features(x) -> (n, d)` and a final linear layer `fc`
(`fc.weight` (C, d), `fc.bias` (C,)), the default influence scope: the built-ins (`linear`, `cnn`,
`resnet18`, the CIFAR ResNets `resnet8` … `resnet56`) and the user's own model, built by a
factory named MODULE:CALLABLE and seen through `FactoryModel`. Imports only torch (and the
model names of the torch-free recipe)."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import BadInputError, first_line
from .recipe import CIFAR_RESNETS, DEFAULT_EPOCHS, RESNET_DEPTHS, is_factory, model_problem

MODELS = tuple(DEFAULT_EPOCHS)
CHANNELS_LAST = CIFAR_RESNETS  # trained in channels_last memory format (`training.train_network`)


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
    """Two conv blocks (each halving the image by a 2x2 max-pool) and a 128-unit hidden layer,
    for images of at least 4x4; made for 28x28 (MNIST, Fashion-MNIST: fc1 takes 32 x 7 x 7)."""

    def __init__(self, in_channels: int, n_classes: int, hidden: int = 128, size: tuple[int, int] = (28, 28)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 5, padding=2)  # (n, 16, H, W) -> pool H // 2
        self.conv2 = nn.Conv2d(16, 32, 5, padding=2)  # (n, 32, H // 2, W // 2) -> pool H // 4
        self.fc1 = nn.Linear(32 * (size[0] // 4) * (size[1] // 4), hidden)
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


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the block's input (He et al. 2016, fig. 2).
    Where the block halves the image and widens the channels, the shortcut is the paper's option
    A: the input subsampled by 2 and padded with zero channels, which adds no parameters."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.stride, self.extra = stride, channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (n, c, ⌈H/s⌉, ⌈W/s⌉)
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride]  # (n, c_in, ⌈H/s⌉, ⌈W/s⌉)
        if self.extra:
            shortcut = nn.functional.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zero channels: (n, c, …)
        return torch.relu(out + shortcut)


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (sec. 4.2): 6n+2 layers, a 3x3 convolution, then three
    stages of n basic blocks with 16, 32 and 64 channels (the second and third halve the image),
    global average pooling and the final `fc`. Any image size and channel count (the pooling
    is global). Convolutions get Kaiming-normal weights (He et al. 2015), as in the paper."""

    def __init__(self, depth: int, in_channels: int, n_classes: int):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise BadInputError(f"`model` resnet{depth}: {RESNET_DEPTHS}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)  # (n, 16, H, W)
        self.bn1 = nn.BatchNorm2d(16)
        layers, width = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):  # (n, 16, H, W) → (n, 32, H/2, W/2) → (n, 64, H/4, W/4)
            for k in range(blocks):
                layers.append(BasicBlock(width, channels, stride if k == 0 else 1))
                width = channels
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, n_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(torch.relu(self.bn1(self.conv1(x))))  # (n, 64, H/4, W/4)
        return x.mean((2, 3))  # (n, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class FactoryModel(nn.Module):
    """The user's own network, as the rest of the code sees a model. Its final linear layer
    `fc` is found by a convention: the last `nn.Linear` registered in the network, taken when the
    network's output on a probe batch is that layer applied to its input, which it sees once, as
    (n, d), with a bias; `features(x)` is that input (a forward pre-hook captures it). A network
    without such a layer has `final_layer` None (`no_final_layer` says why), `fc` = identity and
    `features(x)` = its output; the last-layer scope refuses it.

    The wrapper shares the network's parameters, buffers and submodules (the same dicts), so its
    state_dict, parameter and module names are the user's own: a checkpoint loads into the
    user's class directly, and scopes name the user's modules."""

    def __init__(self, name: str, net: nn.Module, sample_shape: tuple[int, ...], n_classes: int):
        super().__init__()
        self.__dict__["net"] = net  # not a submodule: its members are this module's own (below)
        for members in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[members] = net.__dict__[members]
        self.name = name
        self.final_layer, self.no_final_layer = _final_linear(name, net, sample_shape, n_classes)
        self.training = net.training

    @property
    def fc(self) -> nn.Module:
        return nn.Identity() if self.final_layer is None else self.net.get_submodule(self.final_layer)

    def train(self, mode: bool = True) -> FactoryModel:
        self.net.train(mode)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_layer is None:
            return self.net(x)  # (n, C)
        return _output_and_inputs(self.net, self.fc, x)[1][0]  # (n, d)


def _output_and_inputs(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The network's output on `x` and the inputs `layer` received meanwhile (one per call)."""
    seen = []
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = net(x)
    finally:
        handle.remove()
    return out, seen


def _final_linear(name: str, net: nn.Module, sample_shape: tuple[int, ...], n_classes: int) -> tuple[str | None, str]:
    """The module name of the network's final linear layer (`FactoryModel`'s convention), or None
    and why there is none; refuses a network whose output on a probe batch of two seeded random
    samples is not (2, n_classes)."""
    probe = torch.randn((2, *sample_shape), generator=torch.Generator().manual_seed(0))
    linears = [(key, module) for key, module in net.named_modules() if isinstance(module, nn.Linear)]
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            if not linears:
                out, seen = net(probe), []
            else:
                out, seen = _output_and_inputs(net, linears[-1][1], probe)
    except Exception as exc:  # the user's code: any failure is theirs to fix, told in one line
        raise BadInputError(f"`model` {name}: its forward fails on a batch of shape {tuple(probe.shape)} "
                            f"({type(exc).__name__}: {first_line(exc, 160)})") from None
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInputError(f"`model` {name}: its output for a batch of shape {tuple(probe.shape)} is {got}, not "
                            f"(2, {n_classes}) (n, n_classes)")
    if not linears:
        return None, "it has no nn.Linear"
    key, layer = linears[-1]
    if len(seen) != 1:
        return None, f"its last nn.Linear {key!r} is called {len(seen)} times in a forward pass, not once"
    if seen[0].dim() != 2 or layer.bias is None:
        return None, f"its last nn.Linear {key!r} " + ("has no bias" if layer.bias is None else
                                                       f"takes inputs of shape {tuple(seen[0].shape)}, not (n, d)")
    with torch.no_grad():
        again = layer(seen[0])
    if not torch.allclose(out, again, rtol=1e-5, atol=1e-6 * float(again.abs().max()) + 1e-12):
        return None, f"its output is not its last nn.Linear {key!r} applied to that layer's input"
    return key, ""


def load_factory(name: str) -> Callable:
    """The callable MODULE:CALLABLE names, imported with importlib; refused in one line where
    the module does not import or holds no such callable."""
    module_name, _, attribute = name.partition(":")
    try:
        target = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: whatever stops its import is reported, in short
        raise BadInputError(f"`model` {name}: module {module_name} does not import ({type(exc).__name__}: "
                            f"{first_line(exc, 160)})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise BadInputError(f"`model` {name}: {module_name} has no attribute {attribute}")
        target = getattr(target, part)
    if not callable(target):
        raise BadInputError(f"`model` {name}: {module_name}.{attribute} is not callable (it is of type "
                            f"{type(target).__name__}); give a factory (sample_shape, n_classes) -> nn.Module")
    return target


def build_factory_model(name: str, sample_shape: tuple[int, ...], n_classes: int) -> FactoryModel:
    """The user's model: the factory MODULE:CALLABLE called with (sample_shape, n_classes), checked
    on a probe batch and wrapped (`FactoryModel`)."""
    factory = load_factory(name)
    try:
        net = factory(tuple(sample_shape), n_classes)
    except Exception as exc:  # the user's code
        raise BadInputError(f"`model` {name}: the factory failed on ({tuple(sample_shape)}, {n_classes}) "
                            f"({type(exc).__name__}: {first_line(exc, 160)})") from None
    if not isinstance(net, nn.Module):
        raise BadInputError(f"`model` {name}: the factory returned a {type(net).__name__}, not a torch.nn.Module")
    return FactoryModel(name, net, tuple(sample_shape), n_classes)


def build_model(name: str, sample_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A freshly initialised model for samples of `sample_shape`; the caller seeds torch."""
    if name == "linear":
        in_features = 1
        for size in sample_shape:
            in_features *= size
        return LinearModel(in_features, n_classes)
    if is_factory(name):
        return build_factory_model(name, sample_shape, n_classes)
    if name not in MODELS:
        raise BadInputError(model_problem(name))
    if len(sample_shape) != 3:
        raise BadInputError(f"`model` {name} needs image samples (C, H, W), got shape {tuple(sample_shape)}")
    if name == "cnn":
        if min(sample_shape[1:]) < 4:
            raise BadInputError(f"`model` cnn needs images of at least 4x4 (it pools twice by 2x2), got "
                                f"{sample_shape[1]}x{sample_shape[2]}; use resnet8 or linear")
        return SmallCNN(sample_shape[0], n_classes, size=tuple(sample_shape[1:]))
    if name == "resnet18":
        return ResNet18(sample_shape[0], n_classes)
    return CifarResNet(int(name.removeprefix("resnet")), sample_shape[0], n_classes)


def final_layer_names(model: nn.Module) -> list[str]:
    """The parameter names of the final linear layer, weight then bias (the last-layer scope);
    refused in one line for a model without one, naming the scope that works."""
    if not isinstance(model, FactoryModel):
        return ["fc.weight", "fc.bias"]
    if model.final_layer is None:
        raise BadInputError(f"`scope` last-layer needs the model's final linear layer, and `model` {model.name} has "
                            f"none ({model.no_final_layer}); use `scope` all, or modules:NAME")
    return [f"{model.final_layer}.weight", f"{model.final_layer}.bias"]


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
