"""Serve the pruning flow as a deployment on the configured Prefect API:

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

Runs triggered from the UI fill the `RunParameters` form (prune ratio or ε, dataset, model).
Schedules, the evaluation deployment and event triggers are defined with issue 6.
"""

from flows.parameters import RunParameters
from flows.prune import prune_dataset

if __name__ == "__main__":
    prune_dataset.serve(name="prune-fashion-mnist",
                        parameters={"params": RunParameters(prune_ratio=0.4).model_dump()})
