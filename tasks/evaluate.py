"""Evaluation tasks: the corrupted training set, retrain on a selection, and the
generalization-gap check."""

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pruning_core import corruption, evaluation
from pruning_core.recipe import TrainArgs
from pruning_core.refs import DatasetRef


@task(name="retrain", cache_policy=NO_CACHE, task_run_name="retrain-{labels[selection]}-seed{train_args.seed}")
def retrain(data: DatasetRef, selection: str | None, train_args: TrainArgs, evaluations_per_epoch: int, labels: dict,
            cache: str | None = None) -> dict:
    return evaluation.retrain_stage(data.spec, data.root, selection, train_args, evaluations_per_epoch, labels,
                                    cache=cache)


@task(name="generalization-gap", cache_policy=NO_CACHE, task_run_name="gap-{kind}")
def generalization_gap(kind: str, data: DatasetRef, samples: int, points: int, weight_decay: float,
                       checkpoint: str | None = None, model_name: str | None = None) -> list[dict]:
    from pruning_core.pipeline import torch_threads

    ds = data.load()
    if samples > ds.n:
        get_run_logger().warning("--gap-samples %d is more than the %d training samples: the check uses all of them",
                                 samples, ds.n)
    with torch_threads(1):
        return evaluation.gap_check(kind, ds, samples, points, weight_decay, checkpoint=checkpoint,
                                    model_name=model_name)


@task(name="corrupt-training-set", cache_policy=NO_CACHE)
def corrupt_training_set(data: DatasetRef, label_noise: float, imbalance: float, seed: int, folder: str) -> dict:
    """The dataset with label noise and a long tail, as a Delta table in `folder` (reused where
    one was made for the same source and settings): {"dataset": its spec, **what was done}."""
    return corruption.corrupted_source_stage(data.spec, data.root, label_noise, imbalance, seed, Path(folder))
