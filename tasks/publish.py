"""Publishing tasks: the new version (Delta by default, DVC or lakeFS by `--target`), the
`dataset.version.created` event, run artifacts."""

from pathlib import Path

import numpy as np
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pruning_core import artifacts, figures
from pruning_core.refs import DatasetRef, VersionRef
from pruning_core.targets import open_target

EVENT = "dataset.version.created"


@task(name="commit-version", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def commit_dataset_version(target: str, data: DatasetRef, selection: str, provenance: dict) -> VersionRef:
    ds = data.load()
    sample_id, pruned = artifacts.load_selection(selection)
    if not np.array_equal(sample_id, ds.sample_id):
        raise RuntimeError(f"{selection} does not list the samples of {data.spec} in order")
    version = open_target(target).commit(ds, ~pruned, provenance)
    return VersionRef(target, version, int((~pruned).sum()))


@task(name="draw-figures", cache_policy=NO_CACHE)
def draw_figures(data: DatasetRef, scores: str, selection: str, folder: str, objective: float | None) -> dict[str, str]:
    """The run's pictures (selection.png, and examples.png for images) in `folder`; {name: file}."""
    return figures.draw_run(Path(folder), data.load(), Path(scores), Path(selection), objective)


@task(name="emit-version-event", cache_policy=NO_CACHE)
def emit_version_event(version: VersionRef, run_id: str) -> str | None:
    event = emit_event(event=EVENT, resource={"prefect.resource.id": f"dataset.{open_target(version.uri).name}"},
                       payload={"uri": version.uri, "version": version.version, "run_id": run_id,
                                "n_kept": version.n_kept})
    return str(event.id) if event else None


def class_balance(data: DatasetRef, selection: str) -> list[dict]:
    ds = data.load()
    _, pruned = artifacts.load_selection(selection)
    rows = []
    for c in range(ds.n_classes):
        total = int((ds.y == c).sum())
        kept = int(((ds.y == c) & ~pruned).sum())
        rows.append({"class": c, "samples": total, "kept": kept,
                     "kept %": round(100 * kept / total, 1) if total else 0.0})
    return rows


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(manifest: dict, balance: list[dict]) -> None:
    key = "dataset-pruning"
    create_table_artifact(key=f"{key}-class-balance", table=balance,
                          description=f"Kept samples per class, run {manifest['run_id']}")
    sel, ver, model = manifest["selection"], manifest["version"], manifest["model"]
    timings = "\n".join(f"| {stage} | {seconds:.1f} |" for stage, seconds in manifest["timings"].items())
    pictures = "\n\n".join(f"![{name}]({Path(path).name})" for name, path in manifest["figures"].items())
    markdown = f"""
# Pruning run `{manifest['run_id']}`

| | |
|---|---|
| dataset | `{manifest['dataset']['name']}` ({manifest['dataset']['n']} samples) |
| model | `{model['name']}`, test accuracy {model['test_accuracy']:.4f} |
| method | `{sel['method']}` (solver `{sel['solver']}`), ratio {sel['prune_ratio']}, ε {sel['epsilon']} |
| pruned / kept | {sel['n_pruned']} / {sel['n_kept']} |
| look mislabelled | {manifest['mislabelled']['count']} samples ({manifest['mislabelled']['rule']}) |
| objective ‖Σ s_i‖₂ | {sel['objective']:.6g} |
| paper's bound term | {sel['bound']['order_term']:.6g} |
| version | `{ver['uri']}` @ {ver['version']} |
| run folder | `{manifest['run_dir']}` |

{pictures}

## Timings (s)
| stage | seconds |
|---|---|
{timings}
"""
    create_markdown_artifact(key=f"{key}-summary", description=f"Run {manifest['run_id']}",
                             markdown=figures.inline_images(markdown, Path(manifest["run_dir"])))
