"""Run progress: one Prefect progress artifact per pruning run, advanced per influence shard
and per selection phase, and process-local listeners (the command line's terminal bar).

The run's 100 % is split over its stages by fixed weights; a stage reports `done` of `total`
steps and the artifact shows the sum of finished stages plus the running stage's fraction.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from uuid import UUID

import httpx
from prefect.artifacts import create_progress_artifact, update_progress_artifact

KEY = "dataset-pruning-progress"
# share of the run per stage, in percent (sums to 100)
STAGES = {"train": 10.0, "features": 25.0, "inverse": 10.0, "influence": 35.0, "selection": 15.0, "publish": 5.0}
_ORDER = list(STAGES)
_LISTENERS: list[Callable[[float, str], None]] = []
_LOCK = threading.Lock()
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def listening(listener: Callable[[float, str], None]):
    """Call `listener(percent, text)` on every progress update made in this process."""
    with _LOCK:
        _LISTENERS.append(listener)
    try:
        yield
    finally:
        with _LOCK:
            _LISTENERS.remove(listener)


def percent(stage: str, done: int, total: int) -> float:
    """The run's progress when `stage` has finished `done` of `total` steps."""
    before = sum(STAGES[s] for s in _ORDER[:_ORDER.index(stage)])
    return round(before + STAGES[stage] * (done / total if total else 1.0), 2)


class RunProgress:
    """A handle on the run's progress artifact; `artifact_id` travels to sub-flows and tasks
    as a string, and `RunProgress.attach(id)` updates the same artifact there."""

    def __init__(self, artifact_id: str | None):
        # "ID" or "ID@J/K": round J of a run in K rounds, each round one K-th of the bar
        self.artifact_id = artifact_id
        uuid, _, part = (artifact_id or "").partition("@")
        self._uuid = uuid or None
        self._round, self._rounds = (int(v) for v in part.split("/")) if part else (1, 1)

    def in_round(self, j: int, rounds: int) -> RunProgress:
        """The same artifact, advanced within round `j` of `rounds`."""
        return RunProgress(f"{self._uuid or ''}@{j}/{rounds}")

    @classmethod
    def create(cls, run_id: str) -> RunProgress:
        artifact = create_progress_artifact(progress=0.0, key=KEY, description=f"Run {run_id}: starting")
        _notify(0.0, "starting")
        return cls(str(artifact))

    @classmethod
    def attach(cls, artifact_id: str | None) -> RunProgress:
        return cls(artifact_id)

    def update(self, stage: str, done: int, total: int, note: str = "") -> float:
        value = round((100 * (self._round - 1) + percent(stage, done, total)) / self._rounds, 2)
        text = (f"round {self._round}/{self._rounds} · " if self._rounds > 1 else "") + f"{stage} {done}/{total}" + (
            f": {note}" if note else "")
        if self._uuid:
            try:
                update_progress_artifact(UUID(self._uuid), progress=value, description=text)
            except httpx.HTTPError as exc:  # progress is advisory: a lost update must not fail the run
                logger.warning("progress artifact not updated (%s)", exc)
        _notify(value, text)
        return value

    def phase_callback(self, stage: str) -> Callable[[int, int, str], None]:
        """A plain `(done, total, note)` callback for core functions (no Prefect inside)."""
        return lambda done, total, note="": self.update(stage, done, total, note)


def _notify(value: float, text: str) -> None:
    with _LOCK:
        listeners = list(_LISTENERS)
    for listener in listeners:
        listener(value, text)
