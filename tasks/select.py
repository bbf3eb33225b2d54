"""Selection task: solve over `scores.parquet`, write `selection.parquet`. The `bucketed`
solver maps its buckets over the run's Dask cluster (`flows.cluster.run_cluster`)."""

import contextlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pruning_core import pipeline, selection
from pruning_core.refs import SelectionResult
from pruning_core.selection import SelectionArgs
from tasks.progress import RunProgress


@contextlib.contextmanager
def dask_map(address: str):
    """A `map(f, jobs)` over the workers of the Dask scheduler at `address`: the jobs (each a
    bucket's vectors) are scattered to the workers first, not embedded in the task graph (which
    made Dask warn "Sending large graph of size … MiB" on every bucketed selection)."""
    from distributed import Client

    with Client(address) as client:
        yield lambda f, jobs: client.gather(client.map(f, client.scatter(list(jobs)), pure=False))


@task(name="select-samples", cache_policy=NO_CACHE)
def select_samples(scores: str, args: SelectionArgs, out: str, dask_address: str | None = None,
                   progress: str | None = None) -> SelectionResult:
    """`dask_address`: the run's Dask scheduler, for the bucketed solver; `progress`: the run's
    progress artifact id, advanced per selection phase."""
    phase = RunProgress.attach(progress).phase_callback("selection") if progress else None
    if args.solver != "bucketed":
        return SelectionResult(out, selection.selection_stage(Path(scores), args, Path(out), progress=phase))
    if dask_address is None:
        raise ValueError("the bucketed solver needs the run's Dask scheduler address")
    with dask_map(dask_address) as map_fn:
        return SelectionResult(out, selection.selection_stage(Path(scores), args, Path(out), map_fn, progress=phase))


@task(name="compose-selections", cache_policy=NO_CACHE)
def compose_selections(scores: str, selections: list[str], out: str, prune_ratio: float) -> SelectionResult:
    """The selection of a run in rounds, over round 1's samples (`pipeline.compose_rounds_stage`)."""
    return SelectionResult(out, pipeline.compose_rounds_stage(Path(scores), selections, Path(out), prune_ratio))
