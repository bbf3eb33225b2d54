"""Training-dynamics difficulty, cross-validated: does ordering the easy pool by how early each
sample is learned beat EL2N measured at the end of training?

EL2N from the final scoring model is ≈ 0 for 44 % of Fashion-MNIST's training samples, so at 40 %
pruned the `easiest` order ranks nearly all of its removals by tiny differences. Dataset
cartography (Swayamdipta et al. 2020) ranks by a sample's mean true-class probability over
training instead: samples learned in the first epoch ("easy to learn") apart from those learned
late. Here that confidence is measured at the end of each of the scoring run's epochs.

For each fold of experiments/cross_validation.py (run that first: it makes every fold's scoring run
and retrain cache):
1. retrain the fold's scoring model with the run's recipe and seed, recording every training
   sample's true-class probability at the end of each epoch; the weights must equal the run's
   checkpoint bit for bit (else the confidences describe another model), or the script stops;
2. copy the scoring run to fold<k>/confidence-run with its difficulty column (`el2n`) replaced by
   1 − mean confidence, so the difficulty strata and the `easiest` order both use it;
3. `dataset-prune evaluate --from-run` that copy with the influence method (the product's
   default: `--candidates auto`, `easiest` at 40 %) under fold<k>/confidence, sharing the fold's
   retrain cache.
Then `cross_validation.py … --variant "confidence=…" --first confidence` reads those folders
(a finished variant folder is reused whatever its label's options say) and pools them.

Run:  .venv/bin/python -m experiments.confidence_order --out runs/cross-validation --folds 0,1,2,3,4 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from experiments.cross_validation import evaluate, fold_scoring_run, variant_folder
from pruning_core.data import load_dataset
from pruning_core.models import build_model
from pruning_core.recipe import TrainArgs
from pruning_core.training import predict_logits, train_network


def epoch_confidence(run: Path, threads: int) -> np.ndarray:
    """(n, epochs) true-class probability at the end of each epoch of the run's own training."""
    used = json.loads((run / "manifest.json").read_text())["arguments"]
    ds = load_dataset(used["dataset"], used["data_root"])
    args = TrainArgs(model=used["model"], epochs=used["epochs"], lr=used["lr"], batch_size=used["batch_size"],
                     weight_decay=used["weight_decay"], seed=used["seed"])
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)  # as training.train: the same initialisation
    model = build_model(args.model, ds.sample_shape, ds.n_classes)
    confidence = np.zeros((ds.n, args.epochs), np.float32)

    def at_epoch_end(epoch: int, epochs: int, loss: float) -> None:
        logits = predict_logits(model, ds.x)  # eval mode, no random draws: the trajectory is unchanged
        confidence[:, epoch - 1] = torch.softmax(torch.as_tensor(logits), 1).numpy()[np.arange(ds.n), ds.y]
        model.train()
        print(f"  epoch {epoch}/{epochs}: loss {loss:.4f}", flush=True)

    train_network(model, ds, args, progress=at_epoch_end)
    saved = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    if not all(torch.equal(saved[k], v.cpu()) for k, v in model.state_dict().items()):
        raise SystemExit(f"{run}: retraining with {threads} threads did not give the run's checkpoint bit for bit "
                         "(try --threads with the count its worker had)")
    return confidence


def confidence_run(run: Path, copy: Path, threads: int) -> Path:
    """The scoring run `run` copied to `copy` with `el2n` := 1 − mean epoch-end confidence (made once)."""
    if (copy / "manifest.json").exists():
        return copy
    staging = copy.with_name(copy.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    confidence = epoch_confidence(run, threads)
    np.save(staging / "confidence.npy", confidence)
    table = pq.read_table(run / "scores.parquet")
    i = table.schema.get_field_index("el2n")
    field = table.schema.field(i)
    key = (1.0 - confidence.astype(np.float64).mean(1)).astype(field.type.to_pandas_dtype())
    pq.write_table(table.set_column(i, field, pa.array(key)), staging / "scores.parquet")
    if (run / "forgetting.npy").exists():
        shutil.copy(run / "forgetting.npy", staging / "forgetting.npy")
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["run_dir"] = str(copy)  # the model stays the run's own (manifest["model"]["checkpoint"])
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    staging.rename(copy)
    return copy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/cross-validation", help="cross_validation.py's --out")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--ratio", default="0.4")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=4, help="the evaluation's recipe: 4")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads the scoring run trained with")
    ns = parser.parse_args(argv)
    out = Path(ns.out).resolve()
    for k in (int(f) for f in ns.folds.split(",")):
        fold = out / f"fold{k}"
        scored = fold_scoring_run(fold)
        print(f"fold {k}: confidences of {scored}", flush=True)
        copy = confidence_run(Path(scored), fold / "confidence-run", ns.threads)
        evaluate(out, k, variant_folder(fold, "confidence"), "influence", ns, ["--from-run", str(copy)],
                 f"fold {k}, confidence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
