"""The run's recipes as plain data: the training recipe (`TrainArgs`), the influence settings
(`InfluenceArgs`) and an evaluation's grid (`EvalArgs`), checked as they are made. A field's
default here is the one the flow parameters, the command line and the UI form show (they read
it). Free of torch, so that what only reads or checks arguments (the command line's parser and
`--help`, `select`, `versions`, the flow parameters) starts without loading it; the modules that
train and score import these from here."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import BadInputError
from .selection import METHODS

CIFAR_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56")  # 6n+2 layers (models.py)
# the CIFAR ResNets' epochs, half of them on ¾-size images (LOW_RES_SCALE), fill about 10 minutes of training
# on 2 CPU cores in bfloat16 (resnet8, 14, 20; the deeper ones take longer): docs/method.md#cifar-resnet-recipe
DEFAULT_EPOCHS = {"linear": 0, "cnn": 4, "resnet18": 30, "resnet8": 20, "resnet14": 16, "resnet20": 12,
                  "resnet32": 10, "resnet44": 10, "resnet56": 10}
LOW_RES_SCALE = 0.75  # the side of the images of the low-resolution epochs, as a share of the images' own
# models that take an image of any size (global pooling before their final layer), so low-resolution epochs
LOW_RES_MODELS = (*CIFAR_RESNETS, "resnet18")
# peak SGD learning rates: the CIFAR ResNets' reaches the most in their 10-minute budget
# (docs/method.md#cifar-resnet-recipe); every other model keeps the rate its results were measured with
DEFAULT_LR = {"resnet": 0.2, "other": 0.05}
# the user's own model: a factory `(sample_shape, n_classes) -> nn.Module` named MODULE:CALLABLE
FACTORY_PATTERN = r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$"
MODEL_FORMS = f"{', '.join(DEFAULT_EPOCHS)}, or MODULE:CALLABLE (your factory (sample_shape, n_classes) -> nn.Module)"
RESNET_DEPTHS = (f"a CIFAR ResNet has 6n+2 layers, and those built in are {', '.join(CIFAR_RESNETS)} (resnet18 is "
                 "the ImageNet-style one)")
PRECISIONS = ("auto", "float32", "bfloat16")  # training arithmetic of the networks (`training_precision`)
STRATEGIES = ("exact", "kfac", "ekfac", "cg", "lissa")  # inverse-Hessian strategies (hessians.py)
SCOPE_FORMS = "last-layer, all, modules:NAME[,NAME...]"


def is_factory(model: str) -> bool:
    """Whether `model` names the user's own model factory (MODULE:CALLABLE) rather than a built-in."""
    return re.match(FACTORY_PATTERN, model) is not None


def model_problem(model: str) -> str | None:
    """Why `model` names no model, as a sentence naming the field (None where it names one): a
    built-in (`DEFAULT_EPOCHS`) or MODULE:CALLABLE."""
    if model in DEFAULT_EPOCHS or is_factory(model):
        return None
    if re.fullmatch(r"resnet\d+", model):
        return f"`model` {model}: {RESNET_DEPTHS}; or give your own as MODULE:CALLABLE"
    return f"`model` {model!r} is not a known model; valid: {MODEL_FORMS}"


def default_lr(model: str) -> float:
    """The model's peak learning rate when none is given (`DEFAULT_LR`)."""
    return DEFAULT_LR["resnet" if model in CIFAR_RESNETS else "other"]


def default_low_res_epochs(model: str, epochs: int) -> int:
    """The epochs trained on ¾-size images first when none are given: half of them for the CIFAR
    ResNets (docs/method.md#cifar-resnet-recipe), none for the other models."""
    return epochs // 2 if model in CIFAR_RESNETS else 0


def default_epochs(model: str) -> int:
    """The model's training epochs when none are given; the user's own model gets the cnn's."""
    return DEFAULT_EPOCHS.get(model, DEFAULT_EPOCHS["cnn"])


@dataclass
class TrainArgs:
    """The training recipe. `epochs` is ignored by `linear`, which trains to the optimum."""

    model: str = "cnn"
    epochs: int | None = None  # None: the model's default (DEFAULT_EPOCHS)
    lr: float | None = None  # peak SGD learning rate of the one-cycle schedule; None: the model's (`default_lr`)
    batch_size: int = 128
    weight_decay: float = 5e-4  # λ of J(θ); also the λ of the influence Hessian
    seed: int = 0
    grad_tol: float = 1e-6  # linear only: stop when ‖∇J‖∞ ≤ grad_tol
    augment: bool | None = None  # random 4-pixel-padded crops and flips; None: on for the CIFAR ResNets only
    precision: str = "auto"  # networks: float32, bfloat16 autocast, or auto (`training.training_precision`)
    # the first epochs train on the images downscaled to LOW_RES_SCALE of their side (progressive resizing);
    # None: the model's (`default_low_res_epochs`)
    low_res_epochs: int | None = None
    # test accuracy from the mean logits of each test image and its mirror image; None: where `augment` trains on
    # mirrored images (training.predict_logits)
    test_flips: bool | None = None

    def __post_init__(self):
        if problem := model_problem(self.model):
            raise BadInputError(problem)
        if self.epochs is None:
            self.epochs = default_epochs(self.model)
        if self.lr is None:
            self.lr = default_lr(self.model)
        if self.low_res_epochs is None:
            self.low_res_epochs = default_low_res_epochs(self.model, self.epochs)
        if self.augment is None:  # the CIFAR ResNets' recipe augments (docs/method.md#cifar-resnet-recipe)
            self.augment = self.model in CIFAR_RESNETS
        if self.test_flips is None:
            self.test_flips = self.augment
        if self.epochs < 0 or (self.model != "linear" and self.epochs < 1):
            raise BadInputError(f"`epochs` {self.epochs} must be at least 1")
        if not (self.lr > 0 and np.isfinite(self.lr)):
            raise BadInputError(f"`lr` {self.lr} must be a positive number")
        if self.batch_size < 1:
            raise BadInputError(f"`batch_size` {self.batch_size} must be at least 1")
        if not (self.weight_decay >= 0 and np.isfinite(self.weight_decay)):
            raise BadInputError(f"`weight_decay` {self.weight_decay} must be a non-negative number")
        if not 0 <= self.low_res_epochs <= self.epochs:
            raise BadInputError(f"`low_res_epochs` {self.low_res_epochs} must lie between 0 and `epochs` {self.epochs}")
        if self.low_res_epochs and self.model not in LOW_RES_MODELS and not is_factory(self.model):
            raise BadInputError("`low_res_epochs` applies to models that take any image size "
                                f"({', '.join(LOW_RES_MODELS)}, or your own); {self.model} takes one size only")
        if self.augment and self.model == "linear":
            raise BadInputError("`augment` applies to the networks; linear trains to its optimum on the samples "
                                "as they are")
        if self.test_flips and self.model == "linear":
            raise BadInputError("test-time flips apply to the networks trained on images; linear has none")
        if self.precision not in PRECISIONS:
            raise BadInputError(f"`precision` {self.precision!r} is not known; valid: {', '.join(PRECISIONS)}")
        if self.precision != "auto" and self.model == "linear":
            raise BadInputError(f"`precision` {self.precision} applies to the networks; linear trains to its optimum "
                                "in float64")
        if self.model == "linear" and self.weight_decay <= 0:
            raise BadInputError("`weight_decay` must be > 0 for `model` linear (the optimum must exist)")


def validate_scope(scope: str) -> str:
    if scope in ("last-layer", "all"):
        return scope
    if scope.startswith("modules:") and all(scope[8:].split(",")):
        return scope
    raise BadInputError(f"`scope` {scope!r} is not valid; valid: {SCOPE_FORMS}")


@dataclass
class InfluenceArgs:
    """Influence settings, saved in the manifest; a cache made with other settings is not reused."""

    scope: str = "last-layer"  # last-layer, all, modules:NAME[,NAME...]
    hessian: str = "exact"  # inverse-Hessian strategy: exact, kfac, ekfac, cg, lissa
    damping: float | str = 0.0  # added to the diagonal of H on top of λ; "auto": 1e-3 · trace(H)/p
    projection_dim: int | None = None  # seeded random projection of s_i (applied after H⁻¹)
    projection_kind: str = "gaussian"  # gaussian or rademacher
    projection_seed: int = 0
    block_size: int = 1024  # rows per fixed block; part of the numerical identity of results
    storage_dtype: str = "float32"  # dtype of the stored vectors (and of the final product)
    cg_tol: float = 1e-10
    cg_max_iter: int = 1000
    lissa_depth: int = 2000
    lissa_batch_size: int | None = 512  # None: full-data Hessian-vector products

    def __post_init__(self):
        self.scope = validate_scope(self.scope)
        if self.hessian not in STRATEGIES:
            raise BadInputError(f"`hessian` {self.hessian!r} is not known; valid: {', '.join(STRATEGIES)}")
        if self.hessian in ("kfac", "ekfac") and self.scope != "last-layer":
            raise BadInputError(f"`hessian` {self.hessian} is available for `scope` last-layer; "
                                f"use exact, cg or lissa with `scope` {self.scope}")
        if isinstance(self.damping, str):
            if self.damping != "auto":
                try:
                    self.damping = float(self.damping)
                except ValueError:
                    raise BadInputError(f"`damping` {self.damping!r} must be a non-negative number or 'auto'") from None
        if self.damping != "auto" and not (self.damping >= 0 and np.isfinite(self.damping)):
            raise BadInputError(f"`damping` {self.damping} must be a non-negative number or 'auto'")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise BadInputError(f"`projection_dim` {self.projection_dim} must be at least 1")
        if self.projection_kind not in ("gaussian", "rademacher"):
            raise BadInputError(f"projection kind {self.projection_kind!r}; valid: gaussian, rademacher")
        if self.block_size < 1:
            raise BadInputError(f"block size {self.block_size} must be at least 1")
        if self.storage_dtype not in ("float32", "float64"):
            raise BadInputError(f"storage dtype {self.storage_dtype!r}; valid: float32, float64")


@dataclass
class EvalArgs:
    """An evaluation's grid: every method × prune ratio × seed retrained, against the full data."""

    methods: tuple[str, ...] = ("influence", "random", "el2n", "influence-score", "forgetting", "ccs")
    ratios: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    seeds: tuple[int, ...] = (0, 1, 2)
    target_drop: float = 0.013  # convergence target: full-data accuracy minus this (1.3 points)
    evaluations_per_epoch: int = 4
    gap_samples: int = 5000  # rows of the generalization-gap check (0: skip it)
    gap_points: int = 8  # ε values
    gap_weight_decay: float = 0.01  # λ of the convex gap problems

    def __post_init__(self):
        self.methods, self.ratios, self.seeds = tuple(self.methods), tuple(self.ratios), tuple(self.seeds)
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise BadInputError(f"`methods`: {', '.join(unknown)} unknown; valid: {', '.join(METHODS)}")
        if not self.methods or not self.ratios or not self.seeds:
            raise BadInputError("`methods`, `ratios` and `seeds` each need at least one value")
        if any(not (0 < r < 1) for r in self.ratios):
            raise BadInputError(f"`ratios` {','.join(map(str, self.ratios))}: every ratio must lie strictly in (0, 1)")
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise BadInputError("`seeds` must be distinct non-negative integers")
        for option, values in (("`methods`", self.methods), ("`ratios`", self.ratios)):
            twice = sorted({v for v in values if values.count(v) > 1}, key=values.index)
            if twice:  # each cell would be trained twice and counted twice in every mean
                raise BadInputError(f"{option} lists {', '.join(map(str, twice))} more than once")
        if not (0 <= self.target_drop < 1):
            raise BadInputError(f"`target_drop` {self.target_drop} must lie in [0, 1)")
        if self.evaluations_per_epoch < 1:
            raise BadInputError("`evaluations_per_epoch` must be at least 1")
        if self.gap_samples < 0 or (0 < self.gap_samples < 200) or self.gap_points < 2:
            raise BadInputError("`gap_samples` must be 0 (skip) or ≥ 200, with at least 2 ε values")
