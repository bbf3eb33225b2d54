"""The flow's parameters as a pydantic model, the one schema of every option: name, type,
default, help text and bounds. The Prefect UI's deployment form, the command line's options
(flows/cli.py) and the reference table derive from it; a default the core's argument objects
also use (TrainArgs, InfluenceArgs, SelectionArgs, EvalArgs) is read from them, not written
again. The stage argument objects, which validate naming the field (`BadInputError`: the command
line shows it as its flag), are built from it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

from pruning_core import artifacts
from pruning_core.baselines import NEEDS
from pruning_core.corruption import corrupts
from pruning_core.data import OWN_DATA, parse_dataset_spec, pinned
from pruning_core.errors import BadInputError, first_line, no_file, renamed_fields
from pruning_core.recipe import (
    CIFAR_RESNETS,
    DEFAULT_EPOCHS,
    DEFAULT_LR,
    FACTORY_PATTERN,
    LOW_RES_SCALE,
    MODEL_FORMS,
    PRECISIONS,
    RESNET_DEPTHS,
    STRATEGIES,
    EvalArgs,
    InfluenceArgs,
    TrainArgs,
    model_problem,
)
from pruning_core.selection import (  # selection_args: also imported from here by tests and benchmarks
    CANDIDATES,
    COVERAGE,
    EXTREME_FROM,
    MAX_ROUNDS,
    MAX_SWAP_ROUNDS,
    METHODS,
    MISLABEL_FIRST_FROM,
    SMALLEST_FROM,
    SOLVERS,
    SWAP_ROUNDS,
    SelectionArgs,
    check_train_epochs,
    check_train_epochs_model,
    selection_args,
    train_budget,
)
from pruning_core.targets import open_target


def dask_address_problem(address: str) -> str | None:
    """Why `address` is not a Dask scheduler's address (None where it is one): a scheme Dask
    speaks, and a host and port where the scheme needs them."""
    if not re.fullmatch(r"(tcp|tls|inproc|ucx)://[^\s]+", address):
        return "must look like tcp://host:port"
    from distributed.comm.addressing import parse_address, parse_host_port

    scheme, location = parse_address(address)
    if scheme != "inproc":
        try:
            parse_host_port(location)
        except ValueError as exc:
            return f"must look like tcp://host:port ({first_line(exc)})"
    return None


def run_arguments(run_dir: Path, needed: str) -> dict:
    """The arguments a finished run was given, from its manifest; refused in one line where the
    folder has none (`needed`: what is not known without them)."""
    path = run_dir / "manifest.json"
    if not path.is_file():
        raise BadInputError(f"{run_dir}: no manifest.json, so {needed} not known")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInputError(f"{path}: cannot be read as a run's manifest ({first_line(exc)})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("arguments", {}), dict):
        raise BadInputError(f"{path}: not a run's manifest (a JSON object with the run's arguments)")
    return manifest.get("arguments", {})


def scoring_recipe(run_dir: Path) -> TrainArgs:
    """The training recipe of a finished run, from its manifest (the model's default epochs when
    none were given)."""
    used = run_arguments(run_dir, "the scoring run's epochs are")
    try:
        return TrainArgs(model=used.get("model", TrainArgs.model), epochs=used.get("epochs"))
    except BadInputError as exc:  # its message names the option, which the manifest, not the user, gave here
        raise BadInputError(f"{run_dir / 'manifest.json'}: its arguments are not a run's ({exc.args[0]})") from None


# Labels of the deployment form in the Prefect UI ("Custom run"); other fields get their name.
FIELD_TITLES = {
    "dataset": "Dataset", "data_root": "Data folder", "model": "Model", "checkpoint": "Checkpoint (skips training)",
    "epochs": "Training epochs", "low_res_epochs": "Low-resolution epochs first", "lr": "Learning rate",
    "batch_size": "Batch size", "weight_decay": "Weight decay λ",
    "seed": "Seed", "scope": "Influence scope", "hessian": "Inverse-Hessian strategy", "damping": "Damping",
    "projection_dim": "Projection dimension", "gpu": "GPU workers", "prune_ratio": "Prune ratio (fraction removed)",
    "epsilon": "ε: bound on ‖Σ s_i‖₂", "method": "Selection method", "solver": "Solver",
    "class_balanced": "Class-balanced", "coverage": "Difficulty coverage",
    "candidates": "Candidate order of the solver", "hard_cut": "Hardest share cut first",
    "mislabel_first": "Remove what looks mislabelled first", "label_noise": "Label noise (share flipped)",
    "imbalance": "Class imbalance (smallest / largest class)",
    "swap_rounds": "Swap-search rounds", "rounds": "Pruning rounds (a fresh model scores what each round keeps)",
    "train_epochs": "Epochs the pruned set will be trained for", "shards": "Influence shards",
    "workers": "Local Dask workers", "dask_address": "Dask scheduler address", "out": "Run folder root",
    "target": "Version target", "block_size": "Block size (rows)",
    "train_model": "Retraining model (another architecture)",
}
# checked again by parse_dataset_spec
DATASET_PATTERN = r"^(fashion-mnist|mnist|cifar10|cifar100|npz:.+|delta:.+|folder:.+|parquet:.+)$"


def _model_name(value: str) -> str:
    """A built-in model's name or MODULE:CALLABLE (`recipe.model_problem`), refused as pydantic
    refuses a value out of its choices."""
    if model_problem(value):
        hint = f"; {RESNET_DEPTHS}" if re.fullmatch(r"resnet\d+", value) else ""
        raise PydanticCustomError("model", "Input should be {forms}{hint}", {"forms": MODEL_FORMS, "hint": hint})
    return value


# The choices of the core's argument objects, as the form's enumerations (`auto`: resolved by the selection policy)
# A model: a built-in (the form's drop-down) or the user's own factory, MODULE:CALLABLE
Model = Annotated[str, AfterValidator(_model_name), WithJsonSchema(
    {"anyOf": [{"enum": list(DEFAULT_EPOCHS), "type": "string"}, {"type": "string", "pattern": FACTORY_PATTERN}]})]
Precision = Literal[PRECISIONS]
Hessian = Literal[STRATEGIES]
Method = Literal[METHODS]
Solver = Literal[SOLVERS]
Coverage = Literal[("auto", *COVERAGE)]
Candidates = Literal[("auto", *CANDIDATES)]


def _field_title(name: str, info) -> str:
    return FIELD_TITLES.get(name, name.replace("_", " ").capitalize())


class RunParameters(BaseModel):
    """One pruning run: dataset → model → influence → selection → Delta version."""

    model_config = ConfigDict(extra="forbid", title="Pruning run", field_title_generator=_field_title)

    dataset: str = Field(
        "fashion-mnist", json_schema_extra={"pattern": DATASET_PATTERN},
        description="fashion-mnist, mnist, cifar10, cifar100, npz:PATH, delta:URI[@VERSION], folder:PATH (images in "
                    "PATH/train/<class>/ and PATH/test/<class>/) or parquet:PATH (encoded images and labels; name "
                    "other columns than image and label as parquet:PATH?image=COL&label=COL, delta: too)")
    data_root: str | None = Field(
        None, description="Folder holding a named dataset's files (torchvision datasets); Fashion-MNIST defaults to "
                          "the system copy; not for npz:, delta:, folder: or parquet: sources")
    model: Model = Field(
        TrainArgs.model,
        description=f"Model trained on the dataset: {', '.join(DEFAULT_EPOCHS)}, or MODULE:CALLABLE, your own: a "
                    "factory (sample_shape, n_classes) -> nn.Module in a module every Dask worker imports; its final "
                    "linear layer is the last nn.Linear it registers (docs/guide.md#models)")
    checkpoint: str | None = Field(None, description="Use these weights (a state_dict) instead of training")
    epochs: int | None = Field(
        TrainArgs.epochs, ge=1, le=1000,
        description=f"Training epochs (default: {DEFAULT_EPOCHS['cnn']} for cnn and your own model, "
                    f"{DEFAULT_EPOCHS['resnet18']} for resnet18, "
                    + ", ".join(f"{DEFAULT_EPOCHS[name]} for {name}" for name in CIFAR_RESNETS[:3])
                    + f", {DEFAULT_EPOCHS['resnet32']} for the deeper ones)")
    lr: float | None = Field(TrainArgs.lr, gt=0, description=f"Peak SGD learning rate (default: {DEFAULT_LR['resnet']} "
                             f"for the CIFAR ResNets, {DEFAULT_LR['other']} for the other models)")
    batch_size: int = Field(TrainArgs.batch_size, ge=1, description="Training mini-batch size")
    weight_decay: float = Field(TrainArgs.weight_decay, ge=0,
                                description="λ: L2 penalty in training and in the influence Hessian")
    seed: int = Field(TrainArgs.seed, ge=0, description="Seed of training and of random selection")
    augment: bool | None = Field(
        TrainArgs.augment, description="Train on random crops (4-pixel padding) and horizontal flips of every batch, "
                                       "the usual CIFAR recipe (the networks); default: on for the CIFAR ResNets, "
                                       "off for the other models")
    precision: Precision = Field(
        TrainArgs.precision, description="Arithmetic of a network's training; auto: bfloat16 autocast for the CIFAR "
                                         "ResNets where the device has bf16 (CUDA, a CPU with AVX512-BF16 or AMX), "
                                         "float32 for the other models; the weights stay float32")
    low_res_epochs: int | None = Field(
        TrainArgs.low_res_epochs, ge=0, le=1000,
        description=f"The first epochs train on the images downscaled to {LOW_RES_SCALE:g} of their side "
                    "(progressive resizing; models that take any image size); default: half the epochs for the CIFAR "
                    "ResNets, 0 for the other models")
    scope: str = Field(InfluenceArgs.scope,
                       description="Parameters the influence is taken over: last-layer, all, modules:NAME[,NAME...]")
    hessian: Hessian = Field(InfluenceArgs.hessian, description="Inverse-Hessian strategy")
    damping: float | Literal["auto"] = Field(
        InfluenceArgs.damping,
        description="Added to the Hessian's diagonal on top of λ; 'auto': 1e-3 × mean eigenvalue")
    projection_dim: int | None = Field(
        InfluenceArgs.projection_dim, ge=1,
        description="Random-projection dimension of the stored vectors, below the scope's parameter count (empty: the "
                    "full vectors)")
    gpu: bool = Field(False,
                      description="Shard tasks (and an evaluation's retrainings) request the Dask resource GPU=1")
    prune_ratio: float | None = Field(SelectionArgs.prune_ratio, gt=0, lt=1,
                                      description="Fraction of samples to remove (size-constrained)")
    epsilon: float | None = Field(SelectionArgs.epsilon, gt=0,
                                  description="Bound on ‖Σ s_i‖₂ of the removed set (guaranteed mode)")
    method: Method = Field(SelectionArgs.method, description="The paper's optimisation, or a baseline")
    solver: Solver = Field(
        SelectionArgs.solver, description="Solver of the influence method (scip: exact reference for small n, "
                                          "time-limited; bucketed: buckets solved in parallel on Dask, then a global "
                                          "swap search)")
    class_balanced: bool = Field(SelectionArgs.class_balanced,
                                 description="Prune every class in proportion to its size")
    coverage: Coverage = Field(
        "auto", description="difficulty: the influence method keeps every EL2N difficulty stratum covered (CCS's "
                            "budget layout) and minimises ‖Σ s_i‖ within it; auto: difficulty wherever it applies "
                            "(influence, prune_ratio, greedy/scip, not class_balanced), else none")
    candidates: Candidates = Field(
        "auto", description="order the influence solver's candidate pool is fed in: smallest ‖s_i‖ first (the "
                            "paper's path), a seeded uniform order (a near-uniform draw within each stratum "
                            "whose summed influence is still minimised), or lowest EL2N first; auto: under difficulty "
                            f"coverage below {100 * SMALLEST_FROM:g} % pruned, easiest where no hardest share is cut, "
                            f"else uniform; from {100 * EXTREME_FROM:g} % uniform; smallest otherwise")
    hard_cut: float | None = Field(
        SelectionArgs.hard_cut, ge=0, lt=1,
        description="Under difficulty coverage: the share of the hardest (highest-EL2N) samples removed first; empty: "
                    "the product's schedule, none up to 50 % pruned, then half of every further removal (β = (ratio − "
                    f"0.5) / 2), from {100 * EXTREME_FROM:g} % all of it (β = ratio − 0.5), shifted by train_epochs")
    mislabel_first: bool | None = Field(
        None, description="The influence method under difficulty coverage removes first the samples that look "
                          "mislabelled to the scoring model (confident learning's rule, the most suspect first, "
                          "within the prune ratio) and lays out the rest as before; empty: on there where at least "
                          f"{100 * MISLABEL_FIRST_FROM:g} % of the samples look mislabelled, off for the other methods")
    swap_rounds: int | None = Field(
        SelectionArgs.swap_rounds, ge=0, le=MAX_SWAP_ROUNDS,
        description="At most this many rounds of the influence solver's swap search after its greedy path, 0: the "
                    "path is the answer; empty: 0 under difficulty coverage and for the easiest order, else "
                    f"{SWAP_ROUNDS}")
    rounds: int = Field(
        1, ge=1, le=MAX_ROUNDS, description="Prune in this many rounds, each removing an equal share of the samples "
                                            "(of prune_ratio in all): every round after the first trains a fresh model "
                                            "on the samples still kept, scores them and selects again")
    train_epochs: int | None = Field(
        None, ge=1, le=10000, description="Epochs the pruned set will be trained for, when not the scoring run's: "
                                          "the hard-cut schedule shifts right by 0.1 in ratio per doubling (a "
                                          "longer recipe learns from more of the hard tail), left by 0.2 per "
                                          "halving down to half; empty: the same as the scoring run's epochs")
    shards: int = Field(4, ge=1, le=10000, description="Influence shards (contiguous sample ranges)")
    workers: int = Field(
        2, ge=1, le=256,
        description="Workers of the local Dask cluster (ignored when a Dask scheduler address is given)")
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler",
                                     json_schema_extra={"pattern": r"^(tcp|tls|inproc|ucx)://\S+$"})
    out: str = Field("runs", description="Root of run folders")
    target: str | None = Field(None, description="Receives the version: a Delta table path or URI (delta:URI too; "
                                                 "default datasets/NAME-pruned), dvc:REPO#PATH or "
                                                 "lakefs://REPO/BRANCH/PATH")
    block_size: int = Field(InfluenceArgs.block_size, ge=1, description="Rows per fixed computation block")

    @field_validator("target", mode="before")
    @classmethod
    def _delta_prefix(cls, value):
        """A Delta table as lineage, provenance and `--dataset` name it (`delta:URI`) is the table
        URI: taken as a path, it would make a folder named `delta:` in the working directory."""
        if isinstance(value, str) and value.startswith("delta:"):
            if not value[len("delta:"):].strip():
                raise ValueError("delta: names no table; give delta:URI or the table's path")
            return value[len("delta:"):]
        return value

    @model_validator(mode="after")
    def _check(self):
        if (self.prune_ratio is None) == (self.epsilon is None):
            raise ValueError("give exactly one of prune_ratio and epsilon")
        for name in ("lr", "weight_decay", "epsilon", "prune_ratio"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be finite")
        if self.dask_address is not None and (problem := dask_address_problem(self.dask_address)):
            raise ValueError(f"dask_address {self.dask_address!r} {problem}")
        return self

    # --- stage arguments -------------------------------------------------------------------
    def train_args(self) -> TrainArgs:
        return TrainArgs(model=self.model, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                         weight_decay=self.weight_decay, seed=self.seed, augment=self.augment,
                         precision=self.precision, low_res_epochs=self.low_res_epochs)

    def influence_args(self) -> InfluenceArgs:
        return InfluenceArgs(scope=self.scope, hessian=self.hessian, damping=self.damping,
                             projection_dim=self.projection_dim, block_size=self.block_size,
                             storage_dtype="float64" if self.model == "linear" else "float32")

    def selection_args(self) -> SelectionArgs:
        return self.selection_args_for(self.method, self.prune_ratio, self.seed)

    def selection_args_for(self, method: str, prune_ratio: float | None, seed: int) -> SelectionArgs:
        return selection_args(method, prune_ratio, self.epsilon if prune_ratio is None else None,
                              self.solver if method == self.method else "greedy", seed,
                              self.class_balanced, self.coverage, self.candidates if method == self.method else "auto",
                              self.hard_cut if method == self.method else None,  # baselines as published
                              train_budget=self.train_budget(),
                              mislabel_first=self.mislabel_first if method == self.method else None,
                              swap_rounds=self.swap_rounds if method == self.method else None)

    def train_budget(self) -> float:
        """The pruned set's training epochs ÷ the scoring run's, whose epochs are the recipe's (also
        for --checkpoint, whose training is not known)."""
        return train_budget(self.train_epochs, self.train_args().epochs, self.model)

    def target_uri(self) -> str:
        """Where the version goes: a URI with a scheme as given, `dvc:REPO#PATH` with REPO made
        absolute, a local path (a Delta table) made absolute."""
        target = self.target or f"datasets/{parse_dataset_spec(self.dataset).short_name}-pruned"
        if target.startswith("dvc:"):
            return open_target(target).uri
        if "://" in target:
            return target
        return str(Path(target).expanduser().resolve())

    def pinned(self):
        """These parameters with a Delta source named without a version pinned to the table's
        newest version (`data.pinned`): every stage and worker of the run then loads the rows
        the run trained on, even if a commit lands on the table meanwhile."""
        spec = pinned(self.dataset)
        return self.model_copy(update={"dataset": str(spec)}) if spec.kind == "delta" else self

    def validate_all(self) -> None:
        """Build every stage's arguments so that bad values fail before anything runs."""
        spec = parse_dataset_spec(self.dataset)
        if self.data_root is not None and spec.kind in OWN_DATA:
            raise BadInputError(f"`data_root` {self.data_root}: `dataset` {self.dataset} names its own data; "
                                "`data_root` is for a named dataset (fashion-mnist, cifar10, …), so leave it out")
        self._check_training()
        self.influence_args()
        if self.rounds > 1 and self.prune_ratio is None:
            raise BadInputError(f"`rounds` {self.rounds} splits `prune_ratio` over the rounds; with `epsilon` give one "
                                "round")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise BadInputError(f"`checkpoint` {self.checkpoint}: {no_file(self.checkpoint)}")
        self._check_checkpoint_recipe()
        artifacts.check_can_create(Path(self.out).expanduser().resolve(), "`out`")
        delta_target = self.target is not None and not self.target.startswith(("dvc:", "lakefs://"))  # checked there
        if delta_target and ".." in re.split(r"[/\\]", self.target):
            raise BadInputError(f"`target` {self.target}: '..' is not allowed in a table path (it would leave the "
                                f"folder it names); give the path without it, an absolute path is fine")
        if delta_target and re.search(r"@\d+$", self.target):
            raise BadInputError(f"`target` {self.target}: names a version; a run commits the table's next version, so "
                                "give the table alone")
        open_target(self.target_uri()).check()

    def _check_training(self) -> None:
        """The training recipe, and --train-epochs refused where it would change nothing."""
        self.train_args()
        check_train_epochs(self.train_epochs, self.selection_args())
        check_train_epochs_model(self.train_epochs, self.model)

    def _check_checkpoint_recipe(self) -> None:
        """With --checkpoint nothing trains: training options given would be silently unused (--epochs
        and --weight-decay still count: the training budget and the influence Hessian's λ)."""
        if self.checkpoint is None:
            return
        unused = [f"`{name}`" for name in ("lr", "batch_size", "augment", "precision", "low_res_epochs")
                  if getattr(self, name) != type(self).model_fields[name].default]
        if unused:
            raise BadInputError(f"{', '.join(unused)} with `checkpoint`: nothing is trained (the weights are given); "
                                "leave " + ("them" if len(unused) > 1 else "it") + " out")

    def as_json(self) -> dict:
        return json.loads(self.model_dump_json())


class EvaluateParameters(RunParameters):
    """An evaluation: one scoring run (or an existing run folder), then every method × prune
    ratio × seed retrained from scratch, the full data as the reference."""

    model_config = ConfigDict(extra="forbid", title="Pruning evaluation")

    prune_ratio: float | None = Field(0.4, gt=0, lt=1, description="Prune ratio of the scoring run's own version")
    methods: list[Method] = Field(list(EvalArgs.methods), min_length=1,
                                  description="Selection methods compared (influence is this product's)")
    ratios: list[Annotated[float, Field(gt=0, lt=1)]] = Field(list(EvalArgs.ratios), min_length=1,
                                                              description="Prune ratios evaluated")
    seeds: list[Annotated[int, Field(ge=0)]] = Field(list(EvalArgs.seeds), min_length=1,
                                                     description="Training seeds per cell")
    target_drop: float = Field(EvalArgs.target_drop, ge=0, lt=1,
                               description="Convergence target: full-data accuracy minus this")
    evaluations_per_epoch: int = Field(EvalArgs.evaluations_per_epoch, ge=1, le=100,
                                       description="Test-accuracy measurements per epoch")
    gap_samples: int = Field(EvalArgs.gap_samples, ge=0,
                             description="Samples of the generalization-gap check (0 skips it)")
    gap_points: int = Field(EvalArgs.gap_points, ge=2, le=50, description="ε values of the generalization-gap check")
    gap_weight_decay: float = Field(EvalArgs.gap_weight_decay, gt=0, description="λ of the gap check's convex problems")
    from_run: str | None = Field(None, description="Reuse this run folder's scores and model instead of a scoring run")
    train_model: Model | None = Field(
        None, description="Architecture every retraining trains (the full data and each pruned set) instead of model, "
                          "which scores: select with a cheap proxy, retrain a bigger model; empty: model")
    train_epochs: int | None = Field(None, ge=1, le=10000,
                                     description="Epochs of the retrainings of train_model; empty: its default epochs")
    label_noise: float = Field(
        0.0, ge=0, lt=1, description="Flip each training label with this probability to a class drawn uniformly "
                                     "from the others (symmetric noise, seeded by a seed derived from seed) before "
                                     "scoring; the flipped samples are recorded and the test set stays clean")
    imbalance: float = Field(
        1.0, gt=0, le=1, description="Cut the training classes to a long tail before scoring: class c keeps "
                                     "n_max·imbalance^(c/(C−1)) of its samples (a seeded draw, at least one); 1: "
                                     "none; the test set stays balanced")

    def eval_args(self) -> EvalArgs:
        return EvalArgs(methods=tuple(self.methods), ratios=tuple(self.ratios), seeds=tuple(self.seeds),
                        target_drop=self.target_drop, evaluations_per_epoch=self.evaluations_per_epoch,
                        gap_samples=self.gap_samples, gap_points=self.gap_points,
                        gap_weight_decay=self.gap_weight_decay)

    def run_parameters(self) -> RunParameters:
        """The scoring run's parameters (its `train_epochs` is not the evaluation's: that one is the
        retrainings' epochs)."""
        return RunParameters(**{k: v for k, v in self.model_dump().items()
                                if k in RunParameters.model_fields and k != "train_epochs"})

    def retrain_args(self) -> TrainArgs:
        """The retrainings' recipe: `train_model` for `train_epochs` where it is given (errors name
        those fields), else the scoring model's recipe (`train_args`). The other training options
        are the same for both."""
        if self.train_model is None:
            return self.train_args()
        try:
            return TrainArgs(model=self.train_model, epochs=self.train_epochs, lr=self.lr, batch_size=self.batch_size,
                             weight_decay=self.weight_decay, seed=self.seed, augment=self.augment,
                             precision=self.precision, low_res_epochs=self.low_res_epochs)
        except BadInputError as exc:  # TrainArgs names its own fields
            raise renamed_fields(exc, {"model": "train_model", "epochs": "train_epochs"}) from None

    def train_budget(self) -> float:
        """The retrainings' epochs ÷ the scoring run's (--from-run's, else --epochs), which shift the
        influence method's hard cut; 1 where the retrainings train another architecture than the one
        that scored: epochs compare within one architecture."""
        retraining = self.retrain_args()
        if retraining.model != self.model:
            return 1.0
        scoring = scoring_recipe(Path(self.from_run)).epochs if self.from_run is not None else self.train_args().epochs
        return train_budget(retraining.epochs, scoring, self.model)

    def validate_all(self) -> None:
        if self.train_epochs is not None and self.train_model is None:
            raise BadInputError("`train_epochs` sets the epochs of `train_model`, which is not given: an evaluation "
                                "retrains with its own epochs (`epochs`); to evaluate a longer recipe, retrain a "
                                "run's scores longer (`from_run` RUN `epochs` N)")
        if self.from_run is not None and corrupts(self.label_noise, self.imbalance):
            given = "`label_noise`" if self.label_noise > 0 else "`imbalance`"
            raise BadInputError(f"{given} with `from_run`: the run brings the data it scored; evaluate it with "
                                "`dataset` set to the corrupted table an earlier evaluation scored (delta:…@0)")
        if self.from_run is not None:  # first: the selection's training budget reads its manifest
            self._check_from_run()
            self._check_selection_options_apply()
        super().validate_all()
        self.eval_args()

    def _check_training(self) -> None:
        """The recipes that train here: the scoring run's where it is made (not with --from-run), and
        the retrainings'."""
        if self.from_run is None:
            self.train_args()
        elif self.train_model is not None and self.epochs is not None:
            raise BadInputError(f"`epochs` with `from_run` and `train_model`: the scoring run trained its own epochs "
                                f"and the retrainings of {self.train_model} train `train_epochs`; leave `epochs` out")
        if self.train_model == "linear" and self.train_epochs is not None:
            raise BadInputError("`train_epochs` with `train_model` linear: it trains to its optimum, without epochs")
        self.retrain_args()

    def _check_checkpoint_recipe(self) -> None:
        """The retrainings use the training options, whatever trained --checkpoint."""

    def _check_selection_options_apply(self) -> None:
        """With --from-run no scoring run selects with --method: the influence method's options act
        on the influence selections of --methods only, and would be silently unused without them."""
        listed = ",".join(self.methods)
        given = [f"`{name}`" for name in ("solver", "coverage", "candidates", "mislabel_first", "swap_rounds",
                                          "rounds")
                 if getattr(self, name) != type(self).model_fields[name].default]
        if given and "influence" not in self.methods:
            raise BadInputError(f"{', '.join(given)} appl{'y' if len(given) > 1 else 'ies'} to the influence method, "
                                f"which `methods` {listed} does not list")
        if self.hard_cut is not None and not {"influence", "ccs"} & set(self.methods):
            raise BadInputError(f"`hard_cut` applies to the influence method and ccs, which `methods` {listed} "
                                "does not list")

    def _check_from_run(self) -> None:
        run = Path(self.from_run)
        if self.checkpoint is not None:
            raise BadInputError(f"`checkpoint` with `from_run`: the run {self.from_run} brings its own scores and "
                                "model; give one of them")
        if not artifacts.run_finished(run):
            raise BadInputError(f"`from_run` {self.from_run}: not a finished run folder (no manifest.json, "
                                "scores.parquet or model.pt)")
        used = run_arguments(run, "what it was made with is")
        for name in ("dataset", "model", "data_root"):
            if used.get(name) != getattr(self, name):
                raise BadInputError(f"`from_run` {self.from_run} was made with {name} {used.get(name)!r}, "
                                    f"not {getattr(self, name)!r}")
        # read whole, so that a damaged file is refused now and not after the first retrainings
        columns = artifacts.check_scores(run / "scores.parquet", f"`from_run` {self.from_run}: its scores.parquet"
                                         ).column_names
        missing = [m for m in self.methods if m in NEEDS and NEEDS[m] not in columns]
        if missing:
            raise BadInputError(f"`from_run` {self.from_run}: its scores lack what {', '.join(missing)} need")
