"""What a run checks before it writes anything: the data and the checkpoint load, a given Dask
scheduler answers, and the influence stage's estimated peak memory fits where it will run;
then, on a given cluster, before it trains: every worker opens the data and shares the run
folder. Each failure is a `BadInputError`: one line, exit status 2, nothing left behind."""

from __future__ import annotations

import asyncio
import secrets
import threading
from pathlib import Path

from pruning_core import code_digest
from pruning_core.errors import BadInputError, first_line, renamed_fields
from pruning_core.influence import check_memory, memory_available, stage_estimate
from pruning_core.selection import check_scip_size, class_quotas, round_ratios


def connect_timeout() -> float:
    """Seconds to wait for a scheduler: Dask's own `distributed.comm.timeouts.connect` (30 s by
    default; `DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=5s` shortens it)."""
    import dask
    import distributed  # noqa: F401  (registers Dask's distributed defaults)
    from dask.utils import parse_timedelta

    return float(parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s"))


def scheduler_info(address: str, timeout: float | None = None) -> dict:
    """Ask the Dask scheduler at `address` for its identity (its workers with their memory
    limits); refuse an address where none answers within `timeout` seconds (default:
    `connect_timeout()`). The whole exchange is bounded: a port that accepts but never speaks
    Dask fails like a closed one."""
    timeout = connect_timeout() if timeout is None else timeout

    async def ask() -> dict:
        from distributed.comm import connect

        comm = await connect(address, timeout=timeout)
        try:
            await comm.write({"op": "identity", "n_workers": -1, "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    outcome: dict = {}

    def probe() -> None:  # an event loop of its own, whatever loop the caller runs in
        try:
            outcome["info"] = asyncio.run(asyncio.wait_for(ask(), timeout + 1))
        except BaseException as exc:  # reported below, in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=probe, name="dask-address-check", daemon=True)
    thread.start()
    thread.join(timeout + 10)  # wait_for ends it by then; the margin covers closing the comm
    info, exc = outcome.get("info"), outcome.get("error")
    if isinstance(info, dict) and info.get("type") == "Scheduler":
        return info
    if exc is not None and not isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        raise exc
    if exc is None:
        reason = "no reply" if info is None else f"the reply is not a Dask scheduler's: {str(info)[:80]}"
    elif isinstance(exc, (TimeoutError, asyncio.TimeoutError)) and not str(exc).strip():
        reason = "it accepted the connection but never replied"
    else:
        reason = first_line(exc, 160)
    raise BadInputError(f"`dask_address` {address}: no Dask scheduler answered within {timeout:g} s ({reason}); "
                        f"start one (dask scheduler) or leave `dask_address` out for a local cluster")


def check_workers(address: str, dataset: str, data_root: str | None, fingerprint: str, folder: Path,
                  reads: tuple[str, ...] = (), model: str | None = None) -> int:
    """On the Dask cluster at `address`, ask every worker what it sees of the run
    (`pipeline.worker_view`) before the run trains, and refuse, in one line, a worker that cannot
    open `dataset`, that loads other data under its name (`fingerprint` is this process's), that
    cannot build the user's own `model` (MODULE:CALLABLE: its module does not import there), or
    that cannot read and write in `folder` (the run's staging folder: workers read the model
    from it and write their shards beside it), or that cannot open one of the files `reads`.
    Without this a run on a cluster whose workers lack
    the object store's credentials or the shared filesystem fails only after training. Returns
    the number of workers asked (0: none has joined yet, nothing to check)."""
    from distributed import Client

    from pruning_core.pipeline import worker_view

    probe, token = folder / ".workers-probe", secrets.token_hex(8)
    probe.write_text(token)
    try:
        with Client(address, timeout=connect_timeout(), set_as_default=False) as client:
            views = client.run(worker_view, dataset, data_root, str(probe), tuple(reads), model, on_error="return")
    except (OSError, TimeoutError) as exc:
        raise BadInputError(f"`dask_address` {address}: the scheduler stopped answering ({exc})") from exc
    finally:
        probe.unlink(missing_ok=True)
    for worker, view in sorted(views.items()):
        problem = worker_problem(view, dataset, fingerprint, token, folder)
        if problem:
            raise BadInputError(f"`dask_address` {address}: worker {worker} {problem}")
    return len(views)


def worker_problem(view, dataset: str, fingerprint: str, token: str, folder: Path) -> str | None:
    """Why a worker that answered `view` (`pipeline.worker_view`, or the exception it raised)
    cannot take part in the run; None if it can."""
    if isinstance(view, ImportError):
        return f"cannot run dataset-prune's code ({first_line(view)}); install the same dataset-prune on every worker"
    if isinstance(view, BaseException):  # lost while it answered, or out of memory
        return f"failed while it was asked ({type(view).__name__}: {first_line(view)})"
    if view.get("code") != code_digest():
        return (f"runs other dataset-prune code (its pruning_core sources hash to {str(view.get('code'))[:12]}, here "
                f"to {code_digest()[:12]}); install the same dataset-prune on every worker")
    if "dataset_error" in view:
        return (f"cannot open {dataset} ({view['dataset_error']}); every worker needs this process's access to the "
                f"data (the object store's credentials in its environment, the same `data_root`)")
    if view["fingerprint"] != fingerprint:
        return (f"loads other data as {dataset} (fingerprint {view['fingerprint'][:12]}, not {fingerprint[:12]} as "
                f"here); every worker must see the same data under the same name")
    if "model_error" in view:
        return (f"cannot build the model ({view['model_error']}); every worker must import the model's module: "
                "install it on every worker, or put its folder on their PYTHONPATH")
    if "folder_error" in view or view.get("probe") != token:
        reason = view.get("folder_error", "it holds another run's probe")
        return (f"cannot use the run's folder {folder} ({reason}); the workers read the model there and write "
                f"their shards beside it, so they must share `out`'s filesystem with this process")
    if view.get("unreadable"):
        more = f" and {len(view['unreadable']) - 1} more" if len(view["unreadable"]) > 1 else ""
        return (f"cannot read {view['unreadable'][0]}{more}; the workers read it themselves, so they must share its "
                f"filesystem with this process")
    return None


def check_gpu_workers(address: str, info: dict) -> None:
    """`--gpu` on a given cluster: the shard tasks (and an evaluation's retrainings) ask for the
    Dask resource GPU=1, and Dask holds a task that no worker can take without an error, for
    ever. Refuse a cluster none of whose workers offers it (`info`: `scheduler_info`'s); one with
    no worker yet may still get GPU workers, and passes."""
    workers = info.get("workers") or {}
    if workers and not any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise BadInputError(f"`gpu`: none of the {len(workers)} workers at `dask_address` {address} offers the Dask "
                            "resource GPU, so the tasks asking for it would wait for one for ever; start one worker "
                            f"per GPU with `dask worker {address} --resources GPU=1`, or leave `gpu` out")


def check_local_gpu(params) -> None:
    """`--gpu` with a local cluster, whose workers all offer the resource GPU: on a machine with no
    CUDA device they computed on the CPU, and the option did nothing."""
    if not params.gpu or params.dask_address:
        return
    import torch  # only where it is asked: `evaluate --from-run` reaches here without it

    if not torch.cuda.is_available():
        raise BadInputError("`gpu` without `dask_address`: this machine has no CUDA device for the local cluster's "
                            "workers; leave `gpu` out, or give the address of a cluster with GPU workers")


def gpu_preflight(params) -> None:
    """An evaluation with `--gpu` and `--from-run` (no scoring run, whose `run_preflight` would
    check it): refused where no worker of the given cluster offers the resource GPU, or where a
    local cluster would have no GPU."""
    check_local_gpu(params)
    if params.gpu and params.dask_address:
        check_gpu_workers(params.dask_address, scheduler_info(params.dask_address))


def check_train_model(params) -> None:
    """An evaluation's `train_model` built for the data's samples (shapes only), so that one that
    cannot train on them is refused before the scoring run, not at the first retraining."""
    if params.train_model is None:
        return
    from pruning_core.data import load_dataset
    from pruning_core.models import build_model

    ds = load_dataset(params.dataset, params.data_root)
    try:
        build_model(params.train_model, ds.sample_shape, ds.n_classes)
    except BadInputError as exc:  # the model's check names `model`
        raise renamed_fields(exc, {"model": "train_model"}) from None


def memory_limit(workers: int, info: dict | None) -> tuple[int | None, str]:
    """Bytes the process computing M = B H⁻¹ may use, and where that is. On a given cluster: the
    smallest worker's Dask memory limit (None if the workers have none). On a local cluster:
    the smaller of this machine's available memory and the limit Dask gives each of `workers`
    local workers (total / workers; the nanny restarts a worker past 95 % of it)."""
    import dask

    terminate = dask.config.get("distributed.worker.memory.terminate", default=0.95) or 1.0
    if info is not None:
        limits = [w.get("memory_limit") or 0 for w in info.get("workers", {}).values()]
        limits = [int(limit * terminate) for limit in limits if limit > 0]
        return (min(limits), "the memory limit of the Dask cluster's smallest worker") if limits else (None, "")
    memory = memory_available()
    options = []
    if memory["available"] is not None:
        options.append((memory["available"], "this machine's available memory"))
    if memory["total"] is not None:
        options.append((int(memory["total"] / workers * terminate),
                        f"the memory limit of each of the {workers} local Dask workers"))
    return min(options) if options else (None, "")


def influence_estimate(params, ds, model=None) -> dict:
    """The influence stage's estimate (`stage_estimate`) for this run's data, model and scope;
    `model` defaults to a freshly built one (only its shapes matter)."""
    from pruning_core.models import build_model
    from pruning_core.scopes import scope_parameter_names

    model = model if model is not None else build_model(params.model, ds.sample_shape, ds.n_classes)
    args = params.influence_args()
    sizes = dict(model.named_parameters())
    p = sum(sizes[k].numel() for k in scope_parameter_names(model, args.scope))
    if args.projection_dim is not None and args.projection_dim >= p:
        raise BadInputError(f"`projection_dim` {args.projection_dim} is not below p = {p}, the parameters of `scope` "
                            f"{args.scope}: the projected vectors would be no smaller than the full ones; give less "
                            f"than {p} or leave it out")
    # the features' width counts for the last layer alone (its closed form holds them)
    return stage_estimate(ds.n, p, model.fc.in_features if args.scope == "last-layer" else 0, args)


def run_preflight(params, load_checkpoint: bool = True) -> dict:
    """Check a run's inputs and resources before anything is written; return the influence
    stage's estimate (`influence_estimate`)."""
    from pruning_core.data import load_dataset
    from pruning_core.training import load_model

    ds = load_dataset(params.dataset, params.data_root)
    model = None
    if params.checkpoint and load_checkpoint:
        model = load_model(params.checkpoint, params.model, ds, device="cpu")
    estimate = influence_estimate(params, ds, model)
    if params.method == "influence" and params.solver == "scip":
        check_scip_size(estimate["n"], estimate["k"])
    if params.rounds > 1:  # every round must remove at least one sample
        round_ratios(params.prune_ratio, params.rounds, ds.n)
    if params.class_balanced and params.prune_ratio is not None:  # no class emptied
        class_quotas(ds.y, params.selection_args().n_prune(ds.n))
    check_local_gpu(params)
    info = scheduler_info(params.dask_address) if params.dask_address else None
    if params.gpu and info is not None:
        check_gpu_workers(params.dask_address, info)
    limit, where = memory_limit(params.workers, info)
    check_memory(estimate, limit, where)
    return estimate
