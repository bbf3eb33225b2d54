"""Stage functions the Prefect tasks call: each reads its inputs by path, computes with the
core, writes its output atomically and returns a small summary. No orchestration here."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch

from . import artifacts, code_digest, hessians, influence
from .data import load_dataset
from .errors import DatasetError, first_line
from .mislabel import COLUMNS as MISLABEL_COLUMNS
from .mislabel import looks_mislabelled, mislabel_scores
from .models import build_model
from .recipe import InfluenceArgs, TrainArgs, is_factory
from .refs import DatasetRef, InverseRef, ModelRef, ScoresRef
from .scopes import ScopedLoss, autograd_curvature, scope_parameter_names
from .selection import generalization_bound
from .training import default_device, load_model, predict_logits, train


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with `n` intra-op threads (None: unchanged). Shard work uses a fixed count so its
    floating-point results do not depend on the worker's core count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def release_memory() -> None:
    """Hand memory freed by a finished stage back to the OS (glibc's malloc_trim; a no-op
    elsewhere), so a long-lived worker's size does not grow with every stage it runs."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def train_stage(dataset: str, data_root: str | None, args: TrainArgs, checkpoint_out: Path,
                progress=None) -> ModelRef:
    from .baselines import forgetting_events

    ds = load_dataset(dataset, data_root)
    result = train(ds, args, progress=progress)
    sha = artifacts.save_checkpoint(result.model, checkpoint_out)
    forgetting = None
    if result.correctness is not None:
        forgetting = str(artifacts.save_array(forgetting_events(result.correctness),
                                              artifacts.forgetting_path(Path(checkpoint_out).parent)))
    return ModelRef(args.model, str(checkpoint_out), sha, result.test_accuracy, result.train_accuracy,
                    result.seconds, forgetting=forgetting,
                    info={k: v for k, v in result.info.items() if k != "args"})


def checkpoint_stage(dataset: str, data_root: str | None, model_name: str, checkpoint: str,
                     checkpoint_out: Path) -> ModelRef:
    """Use given weights: load them safely, store a copy in the run folder, measure accuracy."""
    from .training import accuracy

    ds = load_dataset(dataset, data_root)
    model = load_model(checkpoint, model_name, ds)
    sha = artifacts.save_checkpoint(model, checkpoint_out)
    flips = TrainArgs(model=model_name).test_flips  # as the model's own recipe would measure it
    return ModelRef(model_name, str(checkpoint_out), sha, accuracy(model, ds.x_test, ds.y_test, flips=flips),
                    accuracy(model, ds.x, ds.y), 0.0, source_checkpoint=str(checkpoint))


def _claimed_dataset(cache: Path, dataset: str, data_root: str | None):
    """The run's dataset as this process loads it, refused when its content is not the data
    `cache` was claimed for (the fingerprint in its arguments.json, from the process that trained
    the model): a Dask worker that sees other data under the same name (another machine's file at
    that path, another version of a table) would otherwise write shards that this run and later
    ones take for the run's own."""
    ds = load_dataset(dataset, data_root)
    expected = artifacts.claimed_arguments(cache).get("dataset")
    if expected is not None and expected != ds.fingerprint:
        raise DatasetError(f"{dataset} as loaded on {socket.gethostname()} (process {os.getpid()}) is not the data "
                           f"this run trained on (fingerprint {ds.fingerprint[:12]}, not {expected[:12]}); every Dask "
                           "worker must see the same data under the same name")
    return ds


def worker_view(dataset: str, data_root: str | None, probe: str, reads: tuple[str, ...] = (),
                model: str | None = None) -> dict:
    """What this process (a Dask worker, asked before a run trains) sees of the run's inputs:
    `fingerprint`, that of `dataset` as it loads here, or `dataset_error`, why it cannot;
    `model_error`, why the user's own `model` (MODULE:CALLABLE) cannot be built here for that
    data (its module does not import, …); `probe`, the text of the file the run wrote in its
    folder, and that a file can be written beside it (shards are), or `folder_error`, why not;
    `unreadable`, those of the files `reads` it cannot open; `code`, the digest of its
    `pruning_core` (`code_digest`). The dataset stays loaded for the run's shards."""
    view = {"code": code_digest()}
    unreadable = []
    for path in reads:
        try:
            open(path, "rb").close()
        except OSError as exc:
            unreadable.append(f"{path} ({first_line(exc)})")
    if unreadable:
        view["unreadable"] = unreadable
    try:
        ds = load_dataset(dataset, data_root)
        view["fingerprint"] = ds.fingerprint
    except Exception as exc:  # a BadInputError keeps its fields marked: the message that quotes it renders them
        view["dataset_error"] = first_line(exc, raw=True)
    if model is not None and is_factory(model) and "fingerprint" in view:
        try:
            build_model(model, ds.sample_shape, ds.n_classes)
        except Exception as exc:  # the user's code, or its absence here
            view["model_error"] = first_line(exc, raw=True)
    probe = Path(probe)
    try:
        view["probe"] = probe.read_text()
        beside = probe.with_name(f"{probe.name}.{socket.gethostname()}.{os.getpid()}")
        beside.write_text("")
        beside.unlink()
    except OSError as exc:
        view["folder_error"] = first_line(exc)
    return view


@functools.lru_cache(maxsize=2)
def _model_once(checkpoint: str, sha256: str, model_name: str, data: DatasetRef):
    """The model of a checkpoint, loaded once per process (a Dask worker loads it once); keyed by
    the checkpoint's fields, as a `ModelRef` (its `info` a dict) is not hashable."""
    return load_model(checkpoint, model_name, data.load())


def features_shard_stage(cache: Path, model: ModelRef, data: DatasetRef, start: int, end: int, args: InfluenceArgs,
                         *, threads: int | None = 1) -> str | None:
    """Last-layer inputs φ of samples [start, end) (`features_shard_path`; None for other scopes,
    which take gradients from the inputs directly). A shard already written is reused."""
    path = artifacts.features_shard_path(cache, start, end)
    if path.exists():
        return str(path)
    if args.scope != "last-layer":
        return None
    ds = _claimed_dataset(cache, data.spec, data.root)
    with torch_threads(threads if default_device().type == "cpu" else None):
        net = _model_once(model.checkpoint, model.checkpoint_sha256, model.name, data)
        phi = influence.last_layer_inputs(net, ds.x[start:end], args.block_size)
    return str(artifacts.save_features_shard(phi, path))


def _curvature(cache: Path, model, args: InfluenceArgs, data: DatasetRef, feature_paths: list[str], device):
    if args.scope == "last-layer":
        phi = np.concatenate([artifacts.load_features_shard(Path(p)) for p in feature_paths])
        W, b = influence.last_layer_weights(model)
        probs = influence.softmax_probs(phi, W, b, device)
        return influence.last_layer_curvature(phi, probs, args.block_size, device)
    ds = _claimed_dataset(cache, data.spec, data.root)
    loss = ScopedLoss(model, scope_parameter_names(model, args.scope))
    return autograd_curvature(loss, ds.x, ds.y, args.block_size)


def inverse_stage(cache: Path, model: ModelRef, data: DatasetRef, args: InfluenceArgs, *, feature_paths: list[str],
                  weight_decay: float, threads: int | None = 1) -> InverseRef:
    """M = B H⁻¹ by the chosen strategy (B: identity or the seeded projection), saved beside
    a JSON record of the strategy, the damping actually used and convergence figures; an inverse
    already saved (with its record) is reused. `feature_paths`: the features shards. On the
    CPU it runs on `threads` intra-op threads like the shards: the bits of M (a Cholesky, block
    sums) depend on the thread count, which otherwise depends on the process (a LocalCluster
    leaves OMP_NUM_THREADS=1 behind in the process that started it)."""
    path = artifacts.inverse_path(cache)
    if path.exists() and artifacts.inverse_info_path(cache).exists():
        return InverseRef.from_record(artifacts.load_inverse_info(cache))
    net = _model_once(model.checkpoint, model.checkpoint_sha256, model.name, data)
    device = default_device()
    started = time.perf_counter()
    with torch_threads(threads if device.type == "cpu" else None):
        curv = _curvature(cache, net, args, data, feature_paths, device)
        damping = hessians.automatic_damping(curv) if args.damping == "auto" else float(args.damping)
        if args.projection_dim:
            B = hessians.projection_matrix(curv.p, args.projection_dim, args.projection_seed, args.projection_kind,
                                           device)
        else:
            B = torch.eye(curv.p, dtype=torch.float64, device=device)
        M, solve = hessians.inverse_apply(curv, B, args.hessian, weight_decay + damping, tol=args.cg_tol,
                                          max_iter=args.cg_max_iter, depth=args.lissa_depth,
                                          batch_size=args.lissa_batch_size, seed=args.projection_seed)
    info = {"path": str(path), "strategy": solve.strategy, "damping": damping, "shift": solve.shift,
            "iterations": solve.iterations, "residual": solve.residual, "p": curv.p, "k": int(B.shape[0]),
            "seconds": time.perf_counter() - started, **solve.extra}
    artifacts.save_inverse(M.cpu().numpy(), info, cache)
    return InverseRef.from_record(info)


def influence_shard_stage(cache: Path, model: ModelRef, data: DatasetRef, start: int, end: int, args: InfluenceArgs,
                          *, inverse: str, threads: int | None = 1) -> str:
    """The scores table of samples [start, end) (`scores_shard_path`): influence vectors with M
    = B H⁻¹ read from `inverse` (an `.npy` path), loss, EL2N, GraNd, the mislabel scores
    (`mislabel.mislabel_scores`) and the last-layer inputs as embedding. A shard already written
    is reused where it has every column (one written before the mislabel scores is written anew)."""
    import pyarrow.parquet as pq

    path = artifacts.scores_shard_path(cache, start, end)
    if path.exists() and set(MISLABEL_COLUMNS) <= set(pq.read_schema(path).names):
        return str(path)
    ds = _claimed_dataset(cache, data.spec, data.root)
    net = _model_once(model.checkpoint, model.checkpoint_sha256, model.name, data)
    y = ds.y[start:end]
    M = np.load(inverse)
    dtype = np.dtype(args.storage_dtype).type
    device = default_device()  # where the features and the inverse were computed: a GPU worker's GPU
    with torch_threads(threads if device.type == "cpu" else None):
        if args.scope == "last-layer":
            phi = artifacts.load_features_shard(artifacts.features_shard_path(cache, start, end))
            W, b = influence.last_layer_weights(net)
            probs = influence.softmax_probs(phi, W, b, device)
            vectors = influence.influence_vectors(phi, probs, y, M, ds.n, args.block_size, device, dtype=dtype)
            grand = influence.last_layer_gradient_norms(phi, probs, y)
            embedding = phi.astype(np.float32)
        else:
            loss = ScopedLoss(net, scope_parameter_names(net, args.scope))
            Mt = torch.as_tensor(M, device=loss.device).to(loss.dtype)
            parts, grand = [], []
            for a, b in influence.block_ranges(0, end - start, args.block_size):
                G = loss.per_sample_gradients(ds.x[start + a:start + b], y[a:b])
                parts.append((G @ Mt.T / ds.n).double().cpu().numpy())
                grand.append(G.norm(dim=1).double().cpu().numpy())
            vectors, grand = np.concatenate(parts).astype(dtype), np.concatenate(grand)
            embedding = influence.last_layer_inputs(net, ds.x[start:end], args.block_size).astype(np.float32)
            logits = predict_logits(net, ds.x[start:end], args.block_size)
            probs = torch.softmax(torch.as_tensor(logits), 1).numpy()
    loss_values, el2n = influence.loss_and_el2n(probs, y)
    paths = {} if ds.paths is None else {"path": ds.paths[start:end]}  # a folder source's files
    table = artifacts.scores_table({"sample_id": ds.sample_id[start:end], **paths, "label": y, "loss": loss_values,
                                    "el2n": el2n, "grand": grand,
                                    **dict(zip(MISLABEL_COLUMNS, mislabel_scores(probs, y)))},
                                   vectors, embedding=embedding)
    return str(artifacts.save_parquet(table, path))


def merge_scores_stage(shard_paths: list[str], out: Path, metadata: dict, *, inverse: InverseRef, cache: str,
                       forgetting: str | None = None, n_classes: int | None = None) -> ScoresRef:
    """Concatenate shard tables in sample order into `out`, `metadata` and the solve of `inverse`
    (`InverseRef.solve`) in its schema; add `forgetting` (events per sample, from the training
    run's per-epoch correctness) when training recorded it, and `mislabelled`, which needs every
    sample's label and probabilities (`mislabel.looks_mislabelled`). `cache`: the influence cache
    folder; `n_classes`: the dataset's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(p) for p in sorted(shard_paths)])
    if forgetting:
        events = np.load(forgetting)
        table = table.add_column(table.schema.get_field_index("grand") + 1, "forgetting", pa.array(events, pa.int64()))
    flagged = looks_mislabelled(*(artifacts.column_array(table, c) for c in ("label", *MISLABEL_COLUMNS)), n_classes)
    table = table.add_column(table.schema.get_field_index("likely_probability") + 1, "mislabelled",
                             pa.array(flagged))
    metadata = {**metadata, "inverse": inverse.solve()}
    table = table.replace_schema_metadata({"dataset_pruning": json.dumps(metadata, sort_keys=True)})
    artifacts.save_parquet(table, out)
    return ScoresRef(str(out), table.num_rows, table.schema.field("influence").type.list_size, inverse, cache,
                     int(flagged.sum()))


def compose_rounds_stage(scores: Path, selections: list[str], out: Path, prune_ratio: float) -> dict:
    """One selection over the first round's samples from the selections of successive rounds
    (round j's lists only the samples rounds before it kept): `pruned` where any round pruned the
    sample, and `round`, the round that pruned it (0: kept). The objective and bound are taken
    with the first round's stored vectors: the predicted change of the model trained on all the
    data when the whole pruned set is removed."""
    import pyarrow as pa

    table, vectors, _ = artifacts.load_scores(scores)
    sample_id = table.column("sample_id").to_numpy()
    pruned_in = np.zeros(len(sample_id), dtype=np.int8)
    left = np.ones(len(sample_id), dtype=bool)
    for j, path in enumerate(selections, 1):
        ids, pruned = artifacts.load_selection(path)
        if not np.array_equal(ids, sample_id[left]):
            raise RuntimeError(f"round {j}'s selection {path} does not list the samples earlier rounds kept, in order")
        rows = np.flatnonzero(left)[pruned]
        pruned_in[rows] = j
        left[rows] = False
    pruned = pruned_in > 0
    value = float(np.linalg.norm(vectors[pruned].sum(axis=0, dtype=np.float64)))
    n, m = len(sample_id), int(pruned.sum())
    summary = {"prune_ratio": prune_ratio, "epsilon": None, "n": n, "n_pruned": m, "n_kept": n - m,
               "objective": value, "bound": generalization_bound(value, m, n),
               "pruned_per_round": [int((pruned_in == j).sum()) for j in range(1, len(selections) + 1)]}
    paths = artifacts.column_array(table, "path") if "path" in table.column_names else None
    table = artifacts.selection_table(sample_id, pruned, summary, paths)  # its metadata stays with the added column
    artifacts.save_parquet(table.append_column("round", pa.array(pruned_in, pa.int8())), out)
    return summary
