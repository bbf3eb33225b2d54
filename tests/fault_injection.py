"""Faults for the reliability tests, run in processes of their own.

`python tests/fault_injection.py POINT COMMAND ARGS…` runs `dataset-prune COMMAND ARGS…` and
kills its own process with SIGKILL (no cleanup handlers, no `finally`) at one point of a stage.
The real functions do the work; only the kill is added:

- `selection`: the solver has returned, `selection.parquet` is not yet written;
- `commit`: the Delta writer has taken the first quarter of the kept rows, its log entry is not
  yet written (a commit in flight);
- `committed`: the Delta version is committed, the run folder is not yet published;
- `retrained` (`evaluate`): the evaluation has taken its first finished retraining (whose record
  its worker wrote to the retrain cache), and not the others.

`commit_rounds` is the body of one of several processes committing to one Delta table at once;
`KillOnFirstStart` a Dask worker plugin that kills its worker as it starts a task of a given kind.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

from distributed import WorkerPlugin

POINTS = ("selection", "commit", "committed", "retrained")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(point: str) -> None:
    import pyarrow as pa

    import pruning_core.selection as selection
    import pruning_core.versions as versions

    if point == "selection":
        solve = selection.select  # what the selection stage calls

        def select_then_die(*args, **kwargs):
            solve(*args, **kwargs)
            die()

        selection.select = select_then_die
    elif point == "commit":
        write = versions.write_deltalake

        def write_part_then_die(uri, data, **kwargs):
            batches = data.to_batches(max_chunksize=max(1, data.num_rows // 4))

            def stream():
                yield batches[0]
                die()  # the writer asks for the second batch: its commit is in flight

            write(uri, pa.RecordBatchReader.from_batches(data.schema, stream()), **kwargs)

        versions.write_deltalake = write_part_then_die
    elif point == "committed":
        write = versions.write_deltalake

        def write_then_die(*args, **kwargs):
            write(*args, **kwargs)
            die()

        versions.write_deltalake = write_then_die
    elif point == "retrained":
        import flows.evaluate as evaluate

        finished = evaluate.as_completed  # what the evaluation takes its finished retrainings from

        def first_then_die(futures, *args, **kwargs):
            for future in finished(futures, *args, **kwargs):
                yield future
                die()  # the evaluation asks for the next one: the first is taken

        evaluate.as_completed = first_then_die
    else:
        raise SystemExit(f"unknown point {point!r}; valid: {', '.join(POINTS)}")


class KillOnFirstStart(WorkerPlugin):
    """Dask worker plugin: the first worker of the cluster to start executing a task whose key
    begins with `prefix` records {pid, key, done} in `record` (`done`: the files matching
    `done_glob` at that moment) and kills its own process with SIGKILL; the record, created
    exclusively, makes it the only one (the nanny's restarted worker gets the plugin again)."""

    def __init__(self, prefix: str, record: str, done_glob: tuple[str, str]):
        self.prefix, self.record, self.done_glob = prefix, record, done_glob

    def transition(self, key, start, finish, **kwargs):
        if finish != "executing" or not str(key).startswith(self.prefix):
            return
        import json

        try:
            fd = os.open(self.record, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return
        folder, pattern = self.done_glob
        done = len(list(Path(folder).glob(pattern)))
        os.write(fd, json.dumps({"pid": os.getpid(), "key": str(key), "done": done}).encode())
        os.close(fd)
        die()


class _Count(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += 1


def commit_rounds(uri: str, dataset: str, writer: int, rounds: int, barrier, results) -> None:
    """Commit `rounds` versions to `uri`, each after every writer reached `barrier`; put
    (writer, [(round, run_id, version, kept sample ids)], conflicts retried) on `results`.

    From the second round on (the table exists: no writer holds the first-commit lock), each
    writer's first attempt waits at `barrier` once the Delta writer has taken its first rows,
    that is after it read the table's snapshot: all of a round's first attempts commit over the
    same version, so all but one must conflict and retry."""
    import numpy as np
    import pyarrow as pa

    from pruning_core import versions
    from pruning_core.data import load_dataset

    write = versions.write_deltalake
    rendezvous = {"pending": False}

    def write_in_step(table_uri, data, **kwargs):
        if not rendezvous["pending"]:
            return write(table_uri, data, **kwargs)
        rendezvous["pending"] = False

        def rows():
            for i, batch in enumerate(data.to_batches()):
                yield batch
                if i == 0:
                    barrier.wait(timeout=300)

        return write(table_uri, pa.RecordBatchReader.from_batches(data.schema, rows()), **kwargs)

    versions.write_deltalake = write_in_step
    conflicts = _Count()
    logging.getLogger(versions.__name__).addHandler(conflicts)
    ds = load_dataset(dataset)
    done = []
    for r in range(rounds):
        keep = np.random.default_rng(100 * writer + r).random(ds.n) < 0.5
        run_id = f"writer{writer}-round{r}"
        barrier.wait(timeout=300)
        rendezvous["pending"] = r > 0
        version = versions.commit_version(uri, ds, keep, {"run_id": run_id})
        done.append((r, run_id, version, ds.sample_id[keep].tolist()))
    results.put((writer, done, conflicts.count))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    install(sys.argv[1])
    from flows.cli import main

    sys.exit(main(sys.argv[2:]))
