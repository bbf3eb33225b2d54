"""Training task: train (or take given weights) and store `model.pt`."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from pruning_core import pipeline
from pruning_core.recipe import TrainArgs
from pruning_core.refs import DatasetRef, ModelRef


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(data: DatasetRef, args: TrainArgs, checkpoint_out: str) -> ModelRef:
    logger = get_run_logger()

    def progress(epoch, epochs, loss):
        logger.info("epoch %d/%d: training loss %.4f", epoch, epochs, loss)

    model = pipeline.train_stage(data.spec, data.root, args, Path(checkpoint_out), progress)
    logger.info("%s trained in %.1f s: test accuracy %.4f", args.model, model.seconds, model.test_accuracy)
    return model


@task(name="load-checkpoint", cache_policy=NO_CACHE)
def load_checkpoint(data: DatasetRef, model: str, checkpoint: str, checkpoint_out: str) -> ModelRef:
    return pipeline.checkpoint_stage(data.spec, data.root, model, checkpoint, Path(checkpoint_out))
