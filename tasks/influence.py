"""Influence tasks: per-shard last-layer inputs, the inverse Hessian, per-shard influence
vectors and the merge into `scores.parquet`. Shard tasks return paths, never arrays, and skip
shards already written for the same inputs (the cache folder is keyed by them)."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pruning_core import pipeline
from pruning_core.recipe import InfluenceArgs
from pruning_core.refs import DatasetRef, InverseRef, ModelRef, ScoresRef


@task(name="features-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def features_shard(cache: str, model: ModelRef, data: DatasetRef, start: int, end: int,
                   args: InfluenceArgs) -> str | None:
    return pipeline.features_shard_stage(Path(cache), model, data, start, end, args)


@task(name="inverse-hessian", cache_policy=NO_CACHE, retries=1)
def inverse_hessian(cache: str, model: ModelRef, data: DatasetRef, feature_paths: list[str],
                    weight_decay: float, args: InfluenceArgs) -> InverseRef:
    return pipeline.inverse_stage(Path(cache), model, data, args, feature_paths=feature_paths,
                                  weight_decay=weight_decay)


@task(name="influence-shard", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)
def influence_shard(cache: str, model: ModelRef, data: DatasetRef, start: int, end: int,
                    inverse: str, args: InfluenceArgs) -> str:
    return pipeline.influence_shard_stage(Path(cache), model, data, start, end, args, inverse=inverse)


@task(name="merge-scores", cache_policy=NO_CACHE)
def merge_scores(shard_paths: list[str], out: str, metadata: dict, inverse: InverseRef, cache: str,
                 forgetting: str | None = None, n_classes: int | None = None) -> ScoresRef:
    return pipeline.merge_scores_stage(shard_paths, Path(out), metadata, inverse=inverse, cache=cache,
                                       forgetting=forgetting, n_classes=n_classes)
