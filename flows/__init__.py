"""Prefect flows: wiring of the tasks, and the `dataset-prune` command line."""

import logging

from pruning_core.errors import BadInputError


class _BadInputWithoutTraceback(logging.Filter):
    """Prefect logs a failed task's and flow's exception with its traceback; for a `BadInputError`
    (what the user can fix, found only once the run is under way, e.g. an ε that removes every
    sample) the log keeps the one-line reason and drops the traceback: for runs started from the
    command line, from a served deployment or from the UI alike."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], BadInputError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_BadInputWithoutTraceback())
