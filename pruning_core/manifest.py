"""A run's records, built from the stages' references: the manifest (`manifest.json` of the run
folder, also what the flow returns), the provenance committed with the pruned version, and the
selection summary of a run in rounds. Paths are named as they lie in the finished run folder."""

from __future__ import annotations

from pathlib import Path

from .data import Dataset, dataset_summary
from .mislabel import RULE
from .recipe import InfluenceArgs
from .refs import ModelRef, Round, ScoresRef, VersionRef


def influence_entry(args: InfluenceArgs, scores: ScoresRef) -> dict:
    """The manifest's `influence`: the arguments the scores were taken with, the damping the
    solve used (`damping`; `damping_requested`, what was asked: "auto" or a number)."""
    projection = ({"dim": args.projection_dim, "kind": args.projection_kind, "seed": args.projection_seed}
                  if args.projection_dim else None)
    return {"scope": args.scope, "hessian": args.hessian, "damping": scores.inverse.damping,
            "damping_requested": args.damping, "projection": projection, "solve": scores.inverse.record,
            "storage_dtype": args.storage_dtype, "block_size": args.block_size, "vector_dim": scores.p,
            "cache": scores.cache}


def run_manifest(run_id: str, run_dir: Path, ds: Dataset, model: ModelRef, influence: dict, selection: dict,
                 version: VersionRef, figures: dict[str, str], *, timings: dict[str, float], arguments: dict,
                 software: dict, mislabelled: int | None = None) -> dict:
    """The run's manifest. `influence`: `influence_entry`; `selection`: the selection's summary
    (`rounds_summary` for a run in rounds); `figures`: {name: file name in `run_dir`};
    `mislabelled`: how many samples look mislabelled to the scoring model (`ScoresRef.mislabelled`)."""
    return {"run_id": run_id, "run_dir": str(run_dir), "dataset": dataset_summary(ds),
            "model": model.manifest_entry(run_dir), "checkpoint_sha256": model.checkpoint_sha256,
            "arguments": arguments, "influence": influence, "selection": selection,
            "mislabelled": {"count": mislabelled, "rule": RULE},
            "version": {"uri": version.uri, "version": version.version},
            "figures": {name: str(Path(run_dir) / file) for name, file in figures.items()},
            "timings": timings, "software": software}


def version_provenance(run_id: str, run_dir: Path, ds: Dataset, model: ModelRef, selection: dict,
                       arguments: dict) -> dict:
    """What the pruned version records of the run that made it (`versions`/lineage read it)."""
    return {"run_id": run_id, "run_dir": str(run_dir),
            "source": {"name": ds.name, "fingerprint": ds.fingerprint, "n": ds.n}, "model": model.name,
            "checkpoint_sha256": model.checkpoint_sha256, "method": selection["method"],
            "solver": selection["solver"], "prune_ratio": selection["prune_ratio"], "epsilon": selection["epsilon"],
            "n_pruned": selection["n_pruned"], "n_kept": selection["n_kept"], "objective": selection["objective"],
            "arguments": arguments}


def rounds_summary(rounds: list[Round], composed: dict, folder: Path, final: Path) -> dict:
    """The `selection` of a run in rounds: round 1's method and solver, the composed selection
    (`pipeline.compose_rounds_stage`) and each round's figures, its paths named under `final`
    (the run folder `folder` once renamed). Every round carries its `result`."""
    first = rounds[0].result.selection.summary
    return {"method": first["method"], "solver": first["solver"], **composed, "rounds": [
        {"round": r.number, "dataset": r.dataset.replace(str(folder), str(final), 1), "prune_ratio": r.prune_ratio,
         "n_pruned": r.result.selection.n_pruned, "objective": r.result.selection.objective,
         "model_test_accuracy": r.result.model.test_accuracy,
         "folder": str(final / Path(r.folder or folder).relative_to(folder))}
        for r in rounds]}
