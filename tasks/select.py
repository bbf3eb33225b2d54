"""Selection task: solve over `scores.parquet`, write `selection.parquet`. The `bucketed`
solver maps its buckets over a Dask cluster (the given scheduler, or a LocalCluster)."""

import contextlib
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pruning_core import pipeline, selection
from pruning_core.selection import SelectionArgs
from tasks.progress import RunProgress


@contextlib.contextmanager
def dask_map(address: str | None, workers: int):
    """A `map(f, jobs)` over Dask workers: `client.map` then `client.gather`."""
    from distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if address:
            client = stack.enter_context(Client(address))
        else:
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None, host="127.0.0.1"))
            client = stack.enter_context(Client(cluster))
        yield lambda f, jobs: client.gather(client.map(f, jobs, pure=False))


@task(name="select-samples", cache_policy=NO_CACHE)
def select_samples(scores: str, args: SelectionArgs, out: str, dask_address: str | None = None,
                   workers: int = 2, progress: str | None = None) -> dict:
    """`progress`: the run's progress artifact id, advanced per selection phase."""
    phase = RunProgress.attach(progress).phase_callback("selection") if progress else None
    if args.solver != "bucketed":
        return selection.selection_stage(Path(scores), args, Path(out), progress=phase)
    with dask_map(dask_address, workers) as map_fn:
        return selection.selection_stage(Path(scores), args, Path(out), map_fn, progress=phase)


@task(name="compose-selections", cache_policy=NO_CACHE)
def compose_selections(scores: str, selections: list[str], out: str, prune_ratio: float) -> dict:
    """The selection of a run in rounds, over round 1's samples (`pipeline.compose_rounds_stage`)."""
    return pipeline.compose_rounds_stage(Path(scores), selections, Path(out), prune_ratio)
