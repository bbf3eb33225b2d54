"""Training: `linear` by full-batch L-BFGS in float64 to the optimum of
J(θ) = (1/n) Σ_i w_i ℓ(z_i, θ) + (λ/2)‖θ‖², networks by seeded mini-batch SGD; checkpoints
loaded with `weights_only=True`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .data import Dataset, as_float, np_float_dtype
from .errors import BadInputError, CheckpointError, first_line, no_file
from .models import CHANNELS_LAST, LinearModel, build_model, inference_features
from .recipe import CIFAR_RESNETS, LOW_RES_SCALE, TrainArgs


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device) -> None:
    """Wait until `device` has run everything queued on it (CUDA; elsewhere nothing is queued),
    so that a clock read next counts that work."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bfloat16_supported(device: torch.device) -> bool:
    """Whether `device` runs bfloat16 arithmetic natively: CUDA with bf16, or a CPU whose oneDNN
    has bf16 kernels (AVX512-BF16 or AMX); elsewhere autocast would emulate it, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without the probe
            return False
    return False


def training_precision(args: TrainArgs, device: torch.device) -> str:
    """The arithmetic a network trains in: `args.precision` where given; `auto`: bfloat16 autocast
    for the CIFAR ResNets where the device computes in bf16 natively (their convolutions then run
    at least twice as fast), float32 for every other model, whose results stay as they were. The
    weights stay float32 either way; `linear` trains in float64."""
    if args.model == "linear":
        return "float64"
    if args.precision != "auto":
        return args.precision
    return "bfloat16" if args.model in CIFAR_RESNETS and bfloat16_supported(torch.device(device)) else "float32"


@dataclass
class TrainResult:
    model: nn.Module
    test_accuracy: float
    train_accuracy: float
    seconds: float
    correctness: np.ndarray | None = None  # (n, epochs) bool: right at its mini-batch, per epoch
    info: dict = field(default_factory=dict)
    curve: list[dict] = field(default_factory=list)  # test accuracy during training (`evaluations_per_epoch`)
    test_correct: np.ndarray | None = None  # (n_test,) bool: each test sample classified right at the end


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 256, device=None,
                   flips: bool = False) -> np.ndarray:
    """Logits (n, C) in float64 (computed in the model's dtype). With `flips`, the mean of each
    image's logits and its mirror image's (left to right): test-time flips, for a model trained on
    mirrored images: half a point or more for the CIFAR ResNets, at the cost of one more forward pass
    (docs/method.md#cifar-resnet-recipe)."""
    logits = _logits(model, x, batch_size, device)
    if flips and len(x):
        logits = (logits + _logits(model, np.ascontiguousarray(x[..., ::-1]), batch_size, device)) / 2
    return logits


@torch.inference_mode()
def _logits(model: nn.Module, x: np.ndarray, batch_size: int, device) -> np.ndarray:
    device = device or next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    model.eval()
    if len(x) == 0:
        return np.zeros((0, 0))
    batch = lambda a: torch.as_tensor(as_float(x[a:a + batch_size], np_float_dtype(dtype)), device=device)  # noqa: E731
    features = inference_features(model, batch(0))
    out = [model.fc(features(batch(a))).double().cpu() for a in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, device=None, flips: bool = False) -> float:
    return float((predict_logits(model, x, device=device, flips=flips).argmax(1) == y).mean())


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, weight_decay: float,
               weights: np.ndarray | None = None, init: LinearModel | None = None,
               grad_tol: float = 1e-6, device=None, max_rounds: int = 200) -> tuple[LinearModel, dict]:
    """Minimise (1/n) Σ_i w_i ℓ_i + (λ/2)(‖W‖² + ‖b‖²) by L-BFGS in float64.

    n is always len(x): zero weights drop terms without renormalising (θ̂_{−R} of
    docs/method.md#influence-vectors-sign-and-scale).
    Returns the model and {"grad_inf_norm", "iterations"}; raises if ‖∇J‖∞ > grad_tol.
    """
    device = device or default_device()
    n = len(y)
    X = torch.as_tensor(as_float(x.reshape(n, -1), np.float64), device=device)
    Y = torch.tensor(y, device=device)
    w = torch.ones(n, dtype=torch.float64, device=device) if weights is None else \
        torch.as_tensor(weights, dtype=torch.float64, device=device)
    model = LinearModel(X.shape[1], n_classes).double().to(device)
    with torch.no_grad():
        if init is not None:
            model.load_state_dict(init.state_dict())
        else:
            model.fc.weight.zero_()
            model.fc.bias.zero_()
    params = list(model.parameters())
    optimiser = torch.optim.LBFGS(params, lr=1, max_iter=100, tolerance_grad=grad_tol / 10,
                                  tolerance_change=0.0, history_size=30, line_search_fn="strong_wolfe")

    def objective():
        optimiser.zero_grad()
        losses = nn.functional.cross_entropy(model(X), Y, reduction="none")
        value = (w * losses).sum() / n + 0.5 * weight_decay * sum((p * p).sum() for p in params)
        value.backward()
        return value

    grad_norm, rounds = np.inf, 0
    for rounds in range(1, max_rounds + 1):
        optimiser.step(objective)
        objective()
        grad_norm = max(float(p.grad.abs().max()) for p in params)
        if grad_norm <= grad_tol:
            break
    if grad_norm > grad_tol:
        raise RuntimeError(f"L-BFGS stopped at ‖∇J‖∞ = {grad_norm:.2e} > {grad_tol:.0e} after {rounds} rounds")
    return model, {"grad_inf_norm": grad_norm, "lbfgs_rounds": rounds}


def augment_batch(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Each image (n, C, H, W) cropped at a random offset from its copy padded by `pad` zeros on
    every side, then flipped left to right with probability ½: the usual CIFAR augmentation
    (torchvision's RandomCrop(padding=4) and RandomHorizontalFlip), for a whole batch on its device.
    The offsets and flips are drawn from `generator` (on the CPU), so a seed gives the same batches."""
    n, _, h, w = x.shape
    draws = torch.stack([torch.randint(0, 2 * pad + 1, (n,), generator=generator) for _ in range(2)]
                        + [(torch.rand(n, generator=generator) < 0.5).long()])  # (3, n): dy, dx, flip
    # one copy that does not wait for the device (a blocking one would hold every training step)
    dy, dx, flip = draws.to(x.device, non_blocking=True)
    padded = nn.functional.pad(x, (pad, pad, pad, pad)).flatten(2)  # (n, C, (H + 2 pad)(W + 2 pad))
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (n, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (n, W)
    cols = torch.where(flip.bool()[:, None], cols.flip(1), cols)
    # one gather of the H·W pixels of each image, the same for every channel: 3× faster on a CPU than
    # indexing (n, C, H, W) with four broadcast index tensors, and the same result
    index = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).flatten(1)  # (n, H·W)
    return padded.gather(2, index[:, None, :].expand(n, x.shape[1], h * w)).view(n, x.shape[1], h, w)


def low_res_size(sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """(H, W) of the low-resolution epochs' images: LOW_RES_SCALE of each side, at least 1 pixel."""
    if len(sample_shape) != 3:
        raise BadInputError(f"`low_res_epochs` downscales images (C, H, W); these samples are {tuple(sample_shape)}")
    return tuple(max(1, round(LOW_RES_SCALE * side)) for side in sample_shape[1:])


def train_network(model: nn.Module, ds: Dataset, args: TrainArgs, device=None,
                  progress: Callable[[int, int, float], None] | None = None,
                  evaluations_per_epoch: int = 0, curve: list | None = None, *, host_sync: bool = False) -> np.ndarray:
    """Seeded SGD (momentum 0.9, one-cycle lr, weight decay λ on every parameter), on batches
    augmented with `args.augment` (`augment_batch`), in `training_precision` (bfloat16: the
    forward pass under autocast, the loss and the weights in float32). The CIFAR ResNets train in
    channels_last memory format (oneDNN's and cuDNN's fast layout) and are returned in the default
    one.

    The first `args.low_res_epochs` epochs train on each batch downscaled to LOW_RES_SCALE of its
    side (bilinear, antialiased), after augmentation: progressive resizing, which buys the CIFAR
    ResNets more epochs in the same time (docs/method.md#cifar-resnet-recipe).

    Returns correctness (n, epochs): whether each sample was classified right in its own
    mini-batch of each epoch (what forgetting scores count). `progress(epoch, epochs, loss)`.
    With `evaluations_per_epoch` = k > 0, test accuracy is measured k times per epoch and
    appended to `curve` as {epoch, samples_seen, train_seconds, test_accuracy}; train_seconds
    counts training only, not these evaluations.

    The loss and each batch's correctness stay on the device until the epoch ends and are copied
    back once: no step waits for the device, so on a GPU the next steps queue while one runs.
    `host_sync` reads both back after every step instead, waiting for the device each time: the
    plain reference the default is tested against (the same weights and results, bit for bit) and
    timed against (benchmarks/gpu_check.py).
    """
    device = torch.device(device or default_device())
    layout = torch.channels_last if args.model in CHANNELS_LAST else torch.contiguous_format
    model.to(device, memory_format=layout).train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) \
        if training_precision(args, device) == "bfloat16" else contextlib.nullcontext()
    x = torch.as_tensor(as_float(ds.x), device=device)
    y = torch.tensor(ds.y, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    steps = args.epochs * ((ds.n + args.batch_size - 1) // args.batch_size)
    optimiser = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    correctness = np.zeros((ds.n, args.epochs), dtype=bool)
    small = low_res_size(ds.sample_shape) if args.low_res_epochs else None
    batches = (ds.n + args.batch_size - 1) // args.batch_size
    marks = {round(batches * (k + 1) / evaluations_per_epoch) for k in range(evaluations_per_epoch)}
    clock, seen = 0.0, 0
    for epoch in range(args.epochs):
        order = torch.randperm(ds.n, generator=generator).to(device)
        total = torch.zeros((), dtype=torch.float64, device=device)  # Σ loss · batch size, in the epoch
        right = torch.zeros(ds.n, dtype=torch.bool, device=device)  # right at its mini-batch, in the epoch
        started = time.perf_counter()
        for batch, start in enumerate(range(0, ds.n, args.batch_size), 1):
            rows = order[start:start + args.batch_size]
            inputs = augment_batch(x[rows], generator) if args.augment else x[rows]
            if epoch < args.low_res_epochs:
                inputs = nn.functional.interpolate(inputs, size=small, mode="bilinear", antialias=True)
            with autocast:
                logits = model(inputs.contiguous(memory_format=layout)).float()
            loss = nn.functional.cross_entropy(logits, y[rows])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            if host_sync:
                correctness[rows.cpu().numpy(), epoch] = (logits.argmax(1) == y[rows]).cpu().numpy()
                total += loss.item() * len(rows)
            else:
                right[rows] = logits.argmax(1) == y[rows]
                total += loss.detach().double() * len(rows)
            seen += len(rows)
            if batch in marks and curve is not None:
                synchronize(device)  # the clock counts the steps queued so far, not only their launch
                clock += time.perf_counter() - started
                curve.append({"epoch": epoch + batch / batches, "samples_seen": seen, "train_seconds": clock,
                              "test_accuracy": accuracy(model, ds.x_test, ds.y_test, device, flips=args.test_flips)})
                model.train()
                started = time.perf_counter()
        if not host_sync:
            correctness[:, epoch] = right.cpu().numpy()
        if progress:
            progress(epoch + 1, args.epochs, float(total) / ds.n)
    model.to(memory_format=torch.contiguous_format).eval()
    return correctness


def train(ds: Dataset, args: TrainArgs, device=None,
          progress: Callable[[int, int, float], None] | None = None, evaluations_per_epoch: int = 0) -> TrainResult:
    """Train `args.model` on `ds` from a seeded initialisation; returns the model on `device`.
    `evaluations_per_epoch` > 0 records a test-accuracy curve (networks only)."""
    device = device or default_device()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    curve: list[dict] = []
    if args.model == "linear":
        model, info = fit_linear(ds.x, ds.y, ds.n_classes, args.weight_decay, grad_tol=args.grad_tol, device=device)
        info["precision"] = training_precision(args, device)
        correctness = None
    else:
        model = build_model(args.model, ds.sample_shape, ds.n_classes)
        correctness = train_network(model, ds, args, device, progress, evaluations_per_epoch, curve)
        info = {"precision": training_precision(args, device)}
    seconds = time.perf_counter() - started
    test_correct = predict_logits(model, ds.x_test, device=device, flips=args.test_flips).argmax(1) == ds.y_test
    test_accuracy = float(test_correct.mean())
    if args.model != "linear" and evaluations_per_epoch:
        seconds = curve[-1]["train_seconds"]  # training alone
    elif args.model == "linear" and evaluations_per_epoch:  # trained to the optimum: one point
        curve = [{"epoch": 1.0, "samples_seen": ds.n, "train_seconds": seconds, "test_accuracy": test_accuracy}]
    return TrainResult(model, test_accuracy, accuracy(model, ds.x, ds.y, device), seconds, correctness,
                       {**info, "args": asdict(args)}, curve, test_correct)


def load_model(path: str, model_name: str, ds: Dataset, device=None) -> nn.Module:
    """Load a state_dict with `weights_only=True` into a fresh `model_name` for `ds` (the user's
    own model: a state_dict of its own keys, as its class saves it).

    Raises `CheckpointError` for an unreadable file, pickled objects beyond tensors, or weights
    of another architecture or class count.
    """
    device = device or default_device()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise CheckpointError(f"`checkpoint` {path}: {no_file(path)}") from exc
    except Exception as exc:  # the unpickler fails in many ways on bytes that are no checkpoint (KeyError, IndexError…)
        raise CheckpointError(f"`checkpoint` {path}: not a loadable state_dict ({type(exc).__name__}: "
                              f"{first_line(exc, 160)})") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"`checkpoint` {path}: expected a state_dict of tensors")
    model = build_model(model_name, ds.sample_shape, ds.n_classes)
    if model_name == "linear":
        model = model.double()
    try:
        model.load_state_dict({k: v.to(next(iter(model.state_dict().values())).dtype) if v.is_floating_point() else v
                               for k, v in state.items()})
    except RuntimeError as exc:
        raise CheckpointError(f"`checkpoint` {path}: does not fit `model` {model_name} for this dataset "
                              f"({first_line(exc, 160)})") from exc
    return model.to(device).eval()
