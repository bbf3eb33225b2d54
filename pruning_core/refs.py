"""What the stages hand each other: small frozen references to what a stage stored (by path)
with the figures the next stage or the manifest needs. The arrays stay on disk; a reference
crosses process and Dask-worker boundaries cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import artifacts
from .data import Dataset, load_dataset


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as every process names it: `spec` (`fashion-mnist`, `npz:PATH`, `delta:URI@V`, …)
    read under `root` (None: the default data folder). Each process loads it for itself."""

    spec: str
    root: str | None = None

    def load(self) -> Dataset:
        return load_dataset(self.spec, self.root)


@dataclass(frozen=True)
class ModelRef:
    """A model stored as `checkpoint` (`model.pt` of a run folder): trained by the run, or given
    (`source_checkpoint`, the weights it was copied from)."""

    name: str
    checkpoint: str
    checkpoint_sha256: str
    test_accuracy: float
    train_accuracy: float
    seconds: float
    forgetting: str | None = None  # forgetting events per sample (.npy), where training recorded them
    source_checkpoint: str | None = None
    info: dict = field(default_factory=dict)  # the training's own figures (the linear solve's)

    def manifest_entry(self, run_dir: Path) -> dict:
        """The manifest's `model`, its files named as they lie in `run_dir`: a trained model records
        `forgetting` (None where none was recorded), given weights their `source_checkpoint`."""
        entry = {"name": self.name, "checkpoint": str(artifacts.checkpoint_path(run_dir)),
                 "checkpoint_sha256": self.checkpoint_sha256, "test_accuracy": self.test_accuracy,
                 "train_accuracy": self.train_accuracy, "seconds": self.seconds, **self.info}
        if self.source_checkpoint is None:
            entry["forgetting"] = str(artifacts.forgetting_path(run_dir)) if self.forgetting else None
        else:
            entry["source_checkpoint"] = self.source_checkpoint
        return entry


@dataclass(frozen=True)
class InverseRef:
    """M = B H⁻¹ (k × p, `.npy`) stored at `path`, and `record`, its solve as written beside it
    (`inverse-hessian.json`: path, strategy, damping used, shift, iterations, residual, p, k,
    seconds and the strategy's own figures); the manifest's `influence.solve`."""

    path: str
    record: dict

    @classmethod
    def from_record(cls, record: dict) -> InverseRef:
        return cls(record["path"], record)

    @property
    def strategy(self) -> str:
        return self.record["strategy"]

    @property
    def damping(self) -> float:
        return self.record["damping"]

    def solve(self) -> dict:
        """The record less its path and seconds: equal inputs give equal figures, so scores taken
        with equal solves carry equal bytes (`scores.parquet`'s metadata records this)."""
        return {k: v for k, v in self.record.items() if k not in ("path", "seconds")}


@dataclass(frozen=True)
class ScoresRef:
    """`scores.parquet` (n rows, influence vectors of dimension p), the inverse Hessian it was
    scored with (`pipeline.inverse_stage`), the influence cache folder and how many samples look
    mislabelled (`mislabel.looks_mislabelled`)."""

    path: str
    n: int
    p: int
    inverse: InverseRef
    cache: str
    mislabelled: int | None = None


@dataclass(frozen=True)
class SelectionResult:
    """`selection.parquet` and its summary: the manifest's `selection` entry, as the selection
    stage (or the composition of rounds) returned it."""

    path: str
    summary: dict

    @property
    def n_pruned(self) -> int:
        return self.summary["n_pruned"]

    @property
    def objective(self) -> float:
        return self.summary["objective"]


@dataclass(frozen=True)
class VersionRef:
    """A committed version of the pruned dataset: `uri` at `version`, holding `n_kept` samples."""

    uri: str
    version: int
    n_kept: int


@dataclass(frozen=True)
class RoundResult:
    """One round of a run: the model it trained, the scores it took, the selection it made."""

    model: ModelRef
    scores: ScoresRef
    selection: SelectionResult


@dataclass(frozen=True)
class Round:
    """Round `number` of a run in rounds: it pruned `prune_ratio` of `dataset` (the samples the
    rounds before it kept) into `selection_path`; its own files in `folder` (None: the run folder)."""

    number: int
    dataset: str
    prune_ratio: float
    selection_path: str
    folder: str | None = None
    result: RoundResult | None = None
