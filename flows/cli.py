"""`dataset-prune`: the command line. `run` is one Prefect flow run; `select`, `versions` and
`export` work on files alone. Bad input: one line on stderr and exit status 2, nothing written."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
import types
import typing

from pydantic import ValidationError

from pruning_core.errors import BadInputError, no_file

EXIT_BAD_INPUT = 2
STARTUP_TIMEOUT = 120  # seconds the temporary Prefect server may take to answer
_ARGV: list[str] = []  # the arguments of this invocation, recorded in reports


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message; a command's name where it is one
        command = self.prog.removeprefix("dataset-prune").strip()
        raise BadInputError(f"{command}: {message}" if command else message)


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if math.isnan(value):  # else refused later for a range it does lie outside of, but not for what it is
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    return value


def _list(kind):
    name = kind.__name__.strip("_")

    def parse(text: str) -> list:
        parts = text.split(",")
        if not all(part.strip() for part in parts):
            raise argparse.ArgumentTypeError(f"{text!r} has an empty entry; give a comma-separated list of {name}")
        try:
            return [kind(part) for part in parts]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {name}") from None
    return parse


def _damping(text: str):
    return "auto" if text == "auto" else _float(text)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(annotation) -> dict:
    """How argparse reads a field of this annotation: `type=` (or a store_true action)."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if annotation is bool:
        return {"action": "store_true"}
    if origin is list:
        inner = args[0]
        inner = typing.get_args(inner)[0] if typing.get_origin(inner) is typing.Annotated else inner
        return {"type": _list({int: int, float: _float}.get(inner, str))}
    if origin in (typing.Union, types.UnionType):
        if args == [bool]:  # unset: the model decides; --no-NAME turns it off where the model's default is on
            return {"action": argparse.BooleanOptionalAction}
        return _kind(args[0]) if len(args) == 1 else {"type": _damping}  # a number or `auto`
    return {"type": {int: int, float: _float}[annotation]} if annotation in (int, float) else {}


def _literal_values(annotation) -> tuple:
    """The allowed values of a Literal field (or of a list of them, or of an optional one)."""
    if typing.get_origin(annotation) is list:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else annotation
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()


def shown_default(value) -> str:
    """A field's default as help and the reference show it; empty for none (None, False)."""
    if value is None or value is False:
        return ""
    return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _option(parser, model, name: str, help: str | None = None, choices: bool = False, given: bool = False) -> None:
    """--NAME for the field `name` of `model` (flows/parameters.py): type, default and help from
    the field, the help in argparse's lower case with the allowed values and the default. `help`
    where the command gives the option another meaning; `choices` to refuse other values while
    parsing; `given` where the command must know whether the user gave it: its parser default is
    then None, and the field's default applies when it is left out."""
    field = model.model_fields[name]
    values = _literal_values(field.annotation)
    kind = _kind(field.annotation)
    text = help or field.description  # the UI form's sentence case; help reads lower case, as argparse's own
    text = text if text[:2].isupper() else text[0].lower() + text[1:]
    text += ", comma-separated" if typing.get_origin(field.annotation) is list else ""
    text += f"; one of {', '.join(map(str, values))}" if values and not choices else ""
    text += f" (default: {shown_default(field.default)})" if shown_default(field.default) else ""
    default = None if given else list(field.default) if isinstance(field.default, list) else field.default
    action = parser.add_argument(_flag(name), default=default, help=text.replace("%", "%%"), **kind,
                                 **({"choices": values} if choices else {}))
    action.field = field  # tests/test_schema.py compares the parser and the reference with it


def _add_selection_options(parser: argparse.ArgumentParser, model) -> None:
    """--prune-ratio | --epsilon (exactly one), --method, --solver and the influence method's
    options: shared by run and select."""
    mode = parser.add_mutually_exclusive_group()
    for name in ("prune_ratio", "epsilon"):
        _option(mode, model, name)
    for name in ("method", "solver", "coverage", "candidates", "hard_cut", "mislabel_first", "swap_rounds",
                 "train_epochs"):
        # an unknown method or solver is refused by the core, which lists the valid ones; the auto choices by argparse
        _option(parser, model, name, choices=name in ("coverage", "candidates"))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dataset-pruning")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Every option of a flow parameter from its field (`_option`); the rest are the commands' own."""
    from flows.parameters import EvaluateParameters, RunParameters
    from pruning_core.selection import SelectionArgs

    parser = _Parser(prog="dataset-prune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="train, score influence, select, publish a Delta version")
    for name in ("dataset", "data_root", "model", "checkpoint", "epochs", "lr", "batch_size", "weight_decay", "seed",
                 "augment", "precision", "low_res_epochs", "scope", "hessian", "damping", "projection_dim"):
        _option(run, RunParameters, name)
    _add_selection_options(run, RunParameters)
    for name in ("rounds", "class_balanced", "shards", "workers", "dask_address", "out", "target", "block_size", "gpu"):
        _option(run, RunParameters, name)
    run.add_argument("--no-progress", action="store_true", help="no progress bar (shown when stderr is a terminal)")
    run.add_argument("--dry-run", action="store_true", help="print the influence stage's memory/time estimate and stop")

    select = sub.add_parser("select", help="selection alone, over an existing scores.parquet")
    select.add_argument("--scores", required=True, help="a run folder's scores.parquet")
    _add_selection_options(select, RunParameters)
    _option(select, RunParameters, "seed",
            help="seed of the seeded choices: random, CCS's draws, the uniform candidate order")
    _option(select, RunParameters, "class_balanced")
    select.add_argument("--time-limit", type=_float, help="seconds, for --solver scip "
                        f"(default: {shown_default(SelectionArgs.time_limit)})")
    _option(select, RunParameters, "dask_address", help="scheduler for --solver bucketed; without it, a local cluster")
    _option(select, RunParameters, "workers", given=True,
            help="workers of --solver bucketed's local cluster, without --dask-address")
    select.add_argument("--out", required=True, help="the selection's Parquet file (sample_id, pruned)")
    select.add_argument("--pictures", metavar="DIR",
                        help="also draw the selection's pictures into DIR (selection.png; examples.png and "
                             "mislabelled.png for images), "
                             "with the dataset the run folder of --scores names")

    evaluate = sub.add_parser("evaluate", help="retrain on pruned sets per method x ratio x seed; report and plots")
    for name in ("dataset", "data_root", "model", "checkpoint", "epochs", "lr", "batch_size", "weight_decay", "seed",
                 "shards", "workers", "dask_address", "out", "target", "from_run", "target_drop",
                 "evaluations_per_epoch", "gap_samples", "gap_points", "gap_weight_decay", "augment", "precision",
                 "low_res_epochs", "train_model", "train_epochs"):
        _option(evaluate, EvaluateParameters, name)
    _option(evaluate, EvaluateParameters, "prune_ratio", given=True,  # refused with --from-run where given
            help=EvaluateParameters.model_fields["prune_ratio"].description + "; not with --from-run")
    for name in ("methods", "ratios", "seeds"):
        _option(evaluate, EvaluateParameters, name)
    _option(evaluate, EvaluateParameters, "solver", choices=True,
            help="solver of the influence method's selections; bucketed runs on the evaluation's Dask cluster")
    for name in ("coverage", "candidates", "hard_cut", "mislabel_first", "swap_rounds"):
        _option(evaluate, EvaluateParameters, name, choices=name in ("coverage", "candidates"))
    for name in ("label_noise", "imbalance"):
        _option(evaluate, EvaluateParameters, name)
    _option(evaluate, EvaluateParameters, "rounds",
            help="the influence method prunes in this many rounds, a fresh model trained on what each round keeps "
                 "scoring the next; the baselines prune in one, as published")
    _option(evaluate, EvaluateParameters, "gpu")

    versions = sub.add_parser("versions",
                              help="a target's versions (Delta, dvc:REPO#PATH, lakefs://…) with their provenance")
    versions.add_argument("uri", help="a Delta table path or URI (delta:URI too), dvc:REPO#PATH or "
                                      "lakefs://REPO/BRANCH/PATH")
    versions.add_argument("--json", action="store_true", help="print JSON instead of a table")
    versions.add_argument("--lineage", action="store_true",
                          help="per version, the chain of sources it was pruned from, across runs and tables")

    export = sub.add_parser("export", help="a Delta version of a folder:PATH source, written back as an image folder")
    export.add_argument("version", help="a Delta version, URI[@VERSION] as versions lists it (delta:URI too; the "
                                        "newest without @VERSION), of a folder:PATH source")
    export.add_argument("--to", required=True, metavar="DIR",
                        help="a new or empty folder: receives train/<class>/<file> for every kept file and the "
                             "source's whole test (or val) split, hard links where the file system allows, else copies")
    return parser


OPTIONS_BEGIN, OPTIONS_END = "<!-- options: generated by `make options` -->", "<!-- end of options -->"


def options_reference() -> str:
    """Every option of every command as Markdown tables, from the parser itself (the same text as
    `--help`): docs/reference.md (`make options`), which a test keeps equal to this."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    about = {a.dest: a.help for a in sub._choices_actions}
    lines = []
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        lines += [f"#### `dataset-prune {name}`: {about[name]}", "", "| option | what it does |", "|---|---|"]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                metavar = formatter._get_default_metavar_for_optional(action)
                usage = " ".join(action.option_strings) + ("" if action.nargs == 0 else
                                                           " " + formatter._format_args(action, metavar))
            else:
                usage = formatter._get_default_metavar_for_positional(action)
            text = formatter._expand_help(action).replace("|", "\\|")
            lines.append(f"| `{usage}` | {text} |")
        lines.append("")
    return "\n".join(lines)


def write_options_reference(reference: str = "docs/reference.md") -> None:
    """Replace the block between the option markers of `reference` with `options_reference()`."""
    from pathlib import Path

    path = Path(reference)
    text = path.read_text()
    head, _, rest = text.partition(OPTIONS_BEGIN)
    _, _, tail = rest.partition(OPTIONS_END)
    path.write_text(f"{head}{OPTIONS_BEGIN}\n\n{options_reference()}\n{OPTIONS_END}{tail}")


def _pydantic_message(exc: ValidationError, model) -> str:
    err = exc.errors()[0]
    if err["loc"]:
        value = f" {err['input']!r}" if not isinstance(err.get("input"), dict) else ""
        return f"--{str(err['loc'][0]).replace('_', '-')}{value}: {err['msg']}"
    # a check across fields names them as the UI form's parameters (prune_ratio): here, as flags
    return re.sub(r"\b[a-z][a-z_]*\b", lambda m: "--" + m[0].replace("_", "-") if m[0] in model.model_fields else m[0],
                  err["msg"].removeprefix("Value error, "))


def _preflight_text(params) -> str:
    """The run's checks before its flow (bad files, a silent scheduler, too little memory), then
    its memory and time estimate as text. Imported here: torch loads only for commands that train."""
    from flows.preflight import run_preflight
    from pruning_core.influence import format_estimate

    return format_estimate(run_preflight(params))


def cmd_run(ns: argparse.Namespace) -> int:
    from flows.parameters import RunParameters

    values = {k: v for k, v in vars(ns).items() if k not in ("command", "dry_run", "no_progress") and v is not None}
    try:
        params = RunParameters(**values)
    except ValidationError as exc:
        raise BadInputError(_pydantic_message(exc, RunParameters)) from None
    params.validate_all()
    print(_preflight_text(params), file=sys.stderr if not ns.dry_run else sys.stdout)
    if ns.dry_run:
        return 0
    from flows.prune import prune_dataset

    started = time.perf_counter()
    with prefect_api(), progress_bar(not ns.no_progress and sys.stderr.isatty()):
        manifest = prune_dataset(params)
    print(f"run folder:    {manifest['run_dir']}")
    print(f"delta version: {manifest['version']['uri']}@{manifest['version']['version']}")
    print(f"test accuracy: {manifest['model']['test_accuracy']:.4f} ({params.model})")
    sel = manifest["selection"]
    print(f"pruned:        {sel['n_pruned']} of {manifest['dataset']['n']} ({sel['method']}), "
          f"objective ‖Σ s_i‖ = {sel['objective']:.6g}")
    if manifest["mislabelled"]["count"] is not None:
        print(f"mislabelled:   {manifest['mislabelled']['count']} samples look mislabelled (to the scoring model, "
              "by confident learning's rule)")
    for r in sel.get("rounds", []):
        print(f"  round {r['round']}:    {r['n_pruned']} pruned (ratio {r['prune_ratio']:.4g} of those left) "
              f"by a model at test accuracy {r['model_test_accuracy']:.4f}; {r['folder']}")
    if manifest["figures"]:
        print(f"pictures:      {', '.join(manifest['figures'].values())}")
    print(f"wall time:     {time.perf_counter() - started:.1f} s")
    return 0


@contextlib.contextmanager
def progress_bar(enabled: bool):
    """A terminal progress bar on stderr fed by the run's progress updates (the same figures as
    the progress artifact in the UI); log lines print above it."""
    if not enabled:
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    from tasks.progress import listening

    bar = Progress(TextColumn("pruning"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}"), console=Console(stderr=True), redirect_stdout=False,
                   redirect_stderr=True)
    task = bar.add_task("starting", total=100)
    width = max(30, bar.console.width - 60)  # leave the bar its room: a long note is cut on the left

    def show(value: float, text: str) -> None:
        if len(text) > width:
            step, _, note = text.partition(": ")
            text = f"{step}: …{note[-max(1, width - len(step) - 3):]}"
        bar.update(task, completed=value, description=text)

    with bar, listening(show):
        # Prefect's console handlers hold the real stderr: point them at the bar's proxy so
        # that log lines print above the bar instead of through it
        handlers = [h for name in ("", "prefect") for h in logging.getLogger(name).handlers if hasattr(h, "console")]
        saved = [(h, h.console.file) for h in handlers]
        for h in handlers:
            h.console.file = sys.stderr
        try:
            yield
        finally:
            for h, file in saved:
                h.console.file = file


def _die_with_parent():
    """For a child, between fork and exec: SIGTERM it when this process ends (Linux's
    PR_SET_PDEATHSIG). Looked up here, in the parent: the child only calls it."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None
    return functools.partial(prctl, 1, signal.SIGTERM)


def _own_session(server_class):
    """Prefect's temporary server, started in a session of its own, so that a signal to the
    command's whole process group (`timeout`, a scheduler killing the group, Ctrl-C in a terminal)
    does not kill it before the command has marked its runs Crashed: the command stops the server
    itself, and on Linux the server also ends when the command's process does, however it ends."""
    import subprocess

    class OwnSession(server_class):
        def _run_uvicorn_command(self):
            popen = subprocess.Popen
            subprocess.Popen = functools.partial(popen, start_new_session=True, preexec_fn=_die_with_parent())
            try:
                return super()._run_uvicorn_command()
            finally:
                subprocess.Popen = popen

    return OwnSession


@contextlib.contextmanager
def prefect_api():
    """Use the configured Prefect API; with none, start a local server on a free loopback port
    for this run (the default database, so `prefect server start` shows the run later) and
    export its URL, so that Dask worker processes report to the same server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.server.api.server import SubprocessASGIServer

    # a server that lives for one command sends no usage telemetry (offline it would log an ERROR
    # per run); an environment setting of the user's own is kept
    quiet = "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ
    if quiet:
        os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    server = _own_session(SubprocessASGIServer)()
    # a fresh PREFECT_HOME migrates its database first, which can outlast Prefect's 20 s default
    # on a busy machine; a timeout the user set is kept
    server.start(timeout=None if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ else STARTUP_TIMEOUT)
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:  # deliver buffered logs and events (a crash's too) while the server still listens
                APILogWorker.drain_all()
                EventsWorker.drain_all()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        if quiet:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        server.stop()


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from flows.parameters import EvaluateParameters

    if ns.from_run is not None and ns.prune_ratio is not None:
        raise BadInputError("--prune-ratio with --from-run: no scoring run is made, so there is no version of its "
                            "own to prune (the evaluation's ratios are --ratios)")
    values = {k: v for k, v in vars(ns).items() if k != "command" and v is not None}
    try:
        params = EvaluateParameters(**values)
    except ValidationError as exc:
        raise BadInputError(_pydantic_message(exc, EvaluateParameters)) from None
    params.validate_all()
    from flows.preflight import check_train_model, gpu_preflight

    check_train_model(params)
    if not params.from_run:
        print(_preflight_text(params.run_parameters()), file=sys.stderr)
    else:
        gpu_preflight(params)
    from flows.evaluate import evaluate_pruning

    with prefect_api():
        result = evaluate_pruning(params, command="dataset-prune " + " ".join(_ARGV))
    goal = result["targets"]
    print(f"evaluation folder: {result['run_dir']}")
    print(f"report:            {result['report']}")
    done = result["retrainings"]
    if done["reused"]:
        print(f"reused:            {done['reused']} of {done['total']} retrainings, recorded earlier in "
              f"{done['cache']}")
    for path in result["plots"].values():
        print(f"plot:              {path}")
    if "accuracy_drop" in goal:
        from pruning_core.evaluation import targets_line

        print(targets_line(goal))
    return 0


def cmd_select(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from flows.parameters import RunParameters, dask_address_problem, scoring_recipe
    from pruning_core.artifacts import check_can_create
    from pruning_core.selection import (
        check_train_epochs,
        check_train_epochs_model,
        selection_args,
        selection_stage,
        train_budget,
    )

    args = selection_args(ns.method, ns.prune_ratio, ns.epsilon, ns.solver, ns.seed, ns.class_balanced, ns.coverage,
                          ns.candidates, ns.hard_cut, mislabel_first=ns.mislabel_first, swap_rounds=ns.swap_rounds,
                          **({} if ns.time_limit is None else {"time_limit": ns.time_limit}))
    check_train_epochs(ns.train_epochs, args)
    if ns.time_limit is not None and args.solver != "scip":
        raise BadInputError("--time-limit applies to --solver scip (the greedy and bucketed solvers have no limit)")
    if ns.workers is not None and args.solver != "bucketed":
        raise BadInputError("--workers applies to --solver bucketed (the only solver that runs on Dask)")
    workers = RunParameters.model_fields["workers"].default if ns.workers is None else ns.workers
    if workers < 1:
        raise BadInputError(f"--workers {workers} must be at least 1")
    if ns.dask_address is not None:
        if args.solver != "bucketed":
            raise BadInputError("--dask-address applies to --solver bucketed (the only solver that runs on Dask)")
        if problem := dask_address_problem(ns.dask_address):
            raise BadInputError(f"--dask-address {ns.dask_address!r} {problem}")
    if not Path(ns.scores).is_file():
        raise BadInputError(f"--scores {ns.scores}: {no_file(ns.scores)}")
    out = Path(ns.out).resolve()
    if out.is_dir():
        raise BadInputError(f"--out {ns.out}: is a folder; give the selection's file path (e.g. selection.parquet)")
    if out == Path(ns.scores).resolve():
        raise BadInputError(f"--out {ns.out}: is the --scores file; the selection would replace the scores it is "
                            "made from")
    check_can_create(out, "--out", folder=False)
    scored = None
    if ns.pictures:  # refused here, before the selection
        scored = scored_dataset(Path(ns.scores))
        check_can_create(Path(ns.pictures).resolve(), "--pictures")
    if ns.train_epochs is not None:
        recipe = scoring_recipe(Path(ns.scores).resolve().parent)  # the run folder of --scores
        check_train_epochs_model(ns.train_epochs, recipe.model)
        args = dataclasses.replace(args, train_budget=train_budget(ns.train_epochs, recipe.epochs, recipe.model))
    if out.name == "selection.parquet" and (out.parent / "manifest.json").is_file():
        raise BadInputError(f"--out {ns.out}: is a run folder's own selection, which its manifest describes; write "
                            "the new selection elsewhere (another name or folder)")
    if args.solver == "bucketed":
        from flows.cluster import run_cluster
        from flows.preflight import scheduler_info
        from tasks.select import dask_map

        if ns.dask_address:
            scheduler_info(ns.dask_address)  # refuses, in one line, an address where none answers

        with run_cluster(ns.dask_address, workers) as cluster, dask_map(cluster()) as map_fn:
            summary = selection_stage(Path(ns.scores), args, Path(ns.out), map_fn)
    else:
        summary = selection_stage(Path(ns.scores), args, Path(ns.out))
    print(f"{ns.out}: pruned {summary['n_pruned']} of {summary['n']}, objective ‖Σ s_i‖ = {summary['objective']:.6g}")
    if scored is not None:
        drawn = draw_pictures(Path(ns.pictures), scored, Path(ns.scores), Path(ns.out), summary["objective"])
        print(f"pictures:      {', '.join(drawn)}")
    return 0


def scored_dataset(scores):
    """The dataset a run scored, as its manifest beside `scores` names it, checked to list the
    scored samples in their order (the file behind an `npz:` or a table may have changed since)."""
    import numpy as np

    from flows.parameters import run_arguments
    from pruning_core import artifacts
    from pruning_core.data import load_dataset

    needed = "the dataset to draw --pictures from is"
    used = run_arguments(scores.resolve().parent, needed)
    if not used.get("dataset"):
        raise BadInputError(f"{scores.resolve().parent}: its manifest names no dataset, so {needed} not known")
    ds = load_dataset(used["dataset"], used.get("data_root"))
    table, _, _ = artifacts.load_scores(scores, with_vectors=False)
    if not np.array_equal(artifacts.column_array(table, "sample_id"), ds.sample_id):
        raise BadInputError(f"--pictures: {used['dataset']} no longer lists the samples {scores} scored")
    return ds


def draw_pictures(folder, ds, scores, selection, objective: float) -> list[str]:
    """The selection's pictures drawn beside each other in a temporary folder inside `folder`, then
    moved into it: a failed drawing leaves no picture of its own in `folder`. Their paths."""
    import shutil
    import tempfile
    from pathlib import Path

    from pruning_core import figures

    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pictures.", dir=folder))
    try:
        drawn = figures.draw_run(tmp, ds, scores, selection, objective)
        for name in drawn.values():
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [str((folder / name).resolve()) for name in drawn.values()]


def _table_uri(uri: str) -> str:
    """`versions` takes a table as `run --target` does, or in the `delta:URI` form that lineage
    and provenance print; a version suffix (`@N`) is refused: every version is listed."""
    from pathlib import Path

    from pruning_core.data import split_version
    from pruning_core.targets import is_versioning_uri

    if uri.startswith("delta:"):
        uri = uri[len("delta:"):]
    if not uri.strip():
        raise BadInputError("versions: no table given; name a Delta table path or URI, dvc:REPO#PATH or "
                            "lakefs://REPO/BRANCH/PATH")
    if is_versioning_uri(uri):
        return uri
    table, version = split_version(uri)
    if version is not None and not Path(uri).exists():
        raise BadInputError(f"versions {uri}: lists every version of the table; give {table} without @{version}")
    return uri


def cmd_versions(ns: argparse.Namespace) -> int:
    try:
        return _versions(ns)
    except BadInputError as exc:  # the targets name their URI as run's --target: here it is versions' argument
        if exc.as_flags().startswith("--target "):
            raise BadInputError("versions " + exc.as_flags().removeprefix("--target ")) from None
        raise


def _versions(ns: argparse.Namespace) -> int:
    from pruning_core.targets import lineage, open_target

    ns.uri = _table_uri(ns.uri)
    if ns.lineage:
        chains = lineage(ns.uri)
        if ns.json:
            print(json.dumps(chains, indent=2, default=str))
            return 0
        for chain in chains:
            print(_lineage_text(chain))
        return 0
    rows = open_target(ns.uri).versions()
    if ns.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    print(f"{'version':>7}  {'time (UTC)':19}  {'rows':>7}  {'run_id':22}  {'source':28}  "
          "method / ratio / eps  objective")
    for row in rows:
        p = row["provenance"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((row["timestamp"] or 0) / 1000))
        source = (p.get("source") or {}).get("name", "-")
        how = f"{p.get('method', '-')} / {p.get('prune_ratio')} / {p.get('epsilon')}" if p else "-"
        obj = f"{p['objective']:.4g}" if "objective" in p else "-"
        print(f"{row['version']:>7}  {when:19}  {row['rows'] or 0:>7}  {p.get('run_id', '-'):22}  "
              f"{source[-28:]:28}  {how}  {obj}")
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from pruning_core.folders import export_version

    done = export_version(ns.version, ns.to)
    how = "hard links" if not done["copied"] else "copies" if not done["linked"] else \
        f"{done['linked']} hard links, {done['copied']} copies"
    print(f"{done['to']}: {done['train']} kept training files in {done['classes']} class folders and "
          f"{done['test']} {done['test_split']} files of {done['source']}, from {done['version']} ({how})")
    return 0


def _lineage_text(chain: list[dict]) -> str:
    """One version's lineage, newest first: the version, then each source it was pruned from."""
    lines = [f"{chain[0]['ref']}  ({chain[0]['rows']} rows)"]
    for depth, (child, parent) in enumerate(zip(chain, chain[1:])):
        how = child.get("method") or "-"
        how += f"/{child['solver']}" if child.get("solver") else ""
        how += f", ratio {child['prune_ratio']}" if child.get("prune_ratio") is not None else ""
        how += f", ε {child['epsilon']}" if child.get("epsilon") is not None else ""
        how += f", in {child['rounds']} rounds" if (child.get("rounds") or 1) > 1 else ""
        rows = f"{parent['rows']} rows" if parent.get("rows") is not None else "rows unknown"
        lines.append(f"{'   ' * depth}└─ pruned by run {child.get('run_id') or '-'} ({how}) from {parent['ref']}  "
                     f"({rows})")
    return "\n".join(lines)


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe or socket whose reader has gone (poll reports an error on its
    end); if so it is pointed at /dev/null, so that Python's flush at exit does not fail on it again."""
    import select

    try:
        fd = stream.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if not any(events & select.POLLERR for _, events in poller.poll(0)):
            return False
    except (OSError, ValueError):  # no file behind the stream (replaced, closed)
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def main(argv: list[str] | None = None) -> int:
    # delta-rs logs through Rust's env_logger at level warn unless RUST_LOG says otherwise: without an
    # AWS region its SDK prints a WARN line per probe of the instance metadata on stderr, before the
    # command's own one-line error. Errors still show; a RUST_LOG the user sets is kept.
    os.environ.setdefault("RUST_LOG", "error")
    handles_sigterm = threading.current_thread() is threading.main_thread()
    terminated = []
    if handles_sigterm:
        # a scheduler's SIGTERM unwinds like Ctrl-C: staged output is removed, the run is marked
        # crashed and the Prefect server this command started is stopped (the default would leave it running)
        def on_sigterm(signum, frame):
            terminated.append(signum)
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _ARGV[:] = sys.argv[1:] if argv is None else argv
        ns = build_parser().parse_args(argv)
        commands = {"run": cmd_run, "select": cmd_select, "versions": cmd_versions, "evaluate": cmd_evaluate,
                    "export": cmd_export}
        return commands[ns.command](ns)
    except BadInputError as exc:
        print(f"dataset-prune: error: {exc.as_flags().splitlines()[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (BrokenPipeError, SystemExit) as exc:
        # The reader of the output went away: the final print met the closed pipe (`dataset-prune
        # versions | head`: the work is done), or Rich, which prints Prefect's log lines, ended the
        # command with SystemExit(1) at a log line (`dataset-prune run … 2>&1 | head`: the run
        # unwound on the way here as on Ctrl-C). Exit as SIGPIPE would have ended it, without a traceback.
        if isinstance(exc, SystemExit) and exc.code != 1:  # argparse, --help, the SIGTERM handler: not Rich's
            raise
        if not (_reader_gone(sys.stdout) or _reader_gone(sys.stderr)):
            raise
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C: the runs are marked Crashed and the staging removed on the way here
        print("dataset-prune: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception:
        # the SystemExit the signal raised can come back wrapped by what it interrupted (Prefect
        # serialising a task's context re-raises it as a serialization error): still a stop
        if not terminated:
            raise
        print("dataset-prune: stopped by SIGTERM", file=sys.stderr)
        return 128 + terminated[0]
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())


def entry() -> None:
    sys.exit(main())
