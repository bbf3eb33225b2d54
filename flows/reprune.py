"""The `reprune-source` flow: prune a new version of a source Delta table when it lands.

A deployment of this flow is triggered by the `dataset.version.created` event of the source
table (`deployments/prefect.yaml`); the event's payload `{uri, version}` names the version, and
`params` (the deployment's parameters) holds everything else about the run.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from pruning_core.errors import BadInputError

from .parameters import RunParameters
from .prune import prune_dataset


@flow(name="reprune-source")
def reprune_source(uri: str, version: int, params: RunParameters) -> dict:
    """Run `prune-dataset` on `delta:{uri}@{version}` with `params`; return its manifest."""
    run = RunParameters.model_validate({**params.model_dump(), "dataset": f"delta:{uri}@{version}"})
    source = uri if "://" in uri else str(Path(uri).expanduser().resolve())
    if run.target_uri() == source:
        raise BadInputError(f"target {run.target_uri()} is the source table itself: its new version would "
                            "trigger this deployment again; choose another target")
    return prune_dataset(run)
