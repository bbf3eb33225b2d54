"""The Dask cluster of one command: the scheduler given, or a LocalCluster of its own that starts
when a stage first needs it and closes when the command's run ends. No torch here: `select` uses it
too."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor

import dask


def local_cluster_kwargs(workers: int, gpu: bool = False) -> dict:
    """`distributed.LocalCluster` arguments for a command's own cluster of `workers` workers (each
    offering the Dask resource GPU=1 with `gpu`)."""
    # Dask starts local workers with MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap
    # threshold too: every large tensor is then mapped and unmapped afresh, and training runs
    # 2x slower (13.3 s vs 26.9 s for one retraining). Our workers keep glibc's defaults and the
    # stages release freed memory themselves (`pipeline.release_memory`). The Nanny also copies
    # the variable into this process's environment, so it is removed here for later clusters.
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})
    os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)
    # The dashboard on a free loopback port: prefect-dask logs its link at the start of every run (with no
    # dashboard, Dask still serves its health routes on 8787 and the logged link answers 404).
    kwargs = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
              "dashboard_address": "127.0.0.1:0", "host": "127.0.0.1", "silence_logs": logging.WARNING}
    if gpu:
        kwargs["resources"] = {"GPU": 1}
    return kwargs


def quiet_on_interrupt() -> None:
    """Block SIGINT in the calling thread, and so in the threads it starts and the worker processes
    they spawn. Ctrl-C in a terminal signals the whole process group: the command unwinds and
    closes its cluster itself, where each worker used to die on it printing a KeyboardInterrupt
    traceback. Python's multiprocessing resource tracker unblocks SIGINT in the thread that first
    starts it, so it is started first."""
    if not hasattr(signal, "pthread_sigmask"):  # not POSIX
        return
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@contextlib.contextmanager
def run_cluster(dask_address: str | None, workers: int, gpu: bool = False):
    """The Dask scheduler every stage of one run shares, as a function that returns its address:
    `dask_address` as given, or else a LocalCluster of `workers` workers (`local_cluster_kwargs`),
    started when a stage first asks for it and closed when the run ends. A cluster per stage cost every later round's
    influence stage, and the bucketed solver, a cold start and a shutdown of their own (about 8 s
    here). It is not started beside the training: on two cores its workers' imports slowed the
    training by as much as they saved (benchmarks/results/run-cluster.md)."""
    from distributed import LocalCluster

    # cluster start/stop chatter; after the import, which sets the level from Dask's config (INFO)
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if dask_address:
        yield lambda: dask_address
        return

    kwargs = local_cluster_kwargs(workers, gpu)
    starting: list[Future] = []

    def start():  # in a thread of its own, whose blocked SIGINT the workers inherit
        quiet_on_interrupt()
        return LocalCluster(**kwargs)

    def address() -> str:
        if not starting:
            with ThreadPoolExecutor(1, thread_name_prefix="local-dask-cluster") as pool:
                starting.append(pool.submit(start))
        return starting[0].result().scheduler_address

    try:
        yield address
    finally:  # a start under way cannot be stopped (Ctrl-C while waiting for it): it is waited for, then closed
        if starting and starting[0].exception() is None:
            starting[0].result().close()
