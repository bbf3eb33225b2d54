"""Selection task: solve over `scores.parquet`, write `selection.parquet`."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pruning_core import pipeline
from pruning_core.selection import SelectionArgs


@task(name="select-samples", cache_policy=NO_CACHE)
def select_samples(scores: str, args: SelectionArgs, out: str) -> dict:
    return pipeline.selection_stage(Path(scores), args, Path(out))
