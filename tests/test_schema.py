"""One argument schema: every option's default is written once, and what a user sets reaches
the output (the command line, the UI form and the reference table agree; `--target-drop` shows
in the report and the plots)."""

import pytest

from flows.cli import build_parser, main
from pruning_core import evaluation


def _record(method, ratio, seed, accuracies, seconds):
    curve = [{"epoch": i + 1.0, "samples_seen": 100 * (i + 1), "train_seconds": s, "test_accuracy": a}
             for i, (a, s) in enumerate(zip(accuracies, seconds))]
    return {"method": method, "prune_ratio": ratio, "seed": seed, "n_kept": 100, "test_accuracy": accuracies[-1],
            "train_seconds": seconds[-1], "samples_seen": curve[-1]["samples_seen"], "curve": curve}


def test_target_drop_given_on_the_command_line_reaches_the_report_and_the_plots(tmp_path, monkeypatch):
    """`evaluate --target-drop 0.02`: the report's target lines and both plots' target lines said
    1.3 points whatever was given."""
    from flows.parameters import EvaluateParameters

    ns = build_parser().parse_args(["evaluate", "--target-drop", "0.02"])
    args = EvaluateParameters(**{k: v for k, v in vars(ns).items() if k != "command" and v is not None}).eval_args()
    assert args.target_drop == 0.02
    records = [_record("full", 0.0, 0, [0.5, 0.8, 0.9], [1.0, 2.0, 3.0]),
               _record("influence", 0.4, 0, [0.7, 0.885, 0.89], [0.6, 1.2, 1.8]),
               _record("random", 0.4, 0, [0.6, 0.8, 0.85], [0.6, 1.2, 1.8])]
    records = evaluation.add_convergence(records, args.target_drop)
    summary = evaluation.summarise(records)
    goal = evaluation.targets(summary, records, drop=args.target_drop)
    assert goal["accuracy_drop_met"]  # 1 point ≤ 2 (not ≤ 1.3 as before, which 1 also meets) …
    assert records[1]["time_to_target"] == 1.2  # … and 0.885 reaches 0.9 − 0.02 where 0.887 was not reached

    text = evaluation.report_markdown(summary, records, [], goal, {}, {"dataset": "d", "model": "m"})
    assert "full-data accuracy minus 2 points." in text
    assert "- accuracy drop at ratio 0.4: 1.00 points (target ≤ 2): met" in text
    assert "- time to reach full − 2 points at ratio 0.4:" in text
    assert "1.3" not in text

    drawn = {}

    def keep(fig, axes, path):
        import matplotlib.pyplot as plt

        drawn[path.name] = [line for ax in axes for line in ax.get_lines()]
        plt.close(fig)
        return str(path)

    monkeypatch.setattr(evaluation, "save_figure", keep)
    evaluation.draw_plots(summary, records, [], tmp_path, target_drop=args.target_drop)
    lines = {line.get_label(): line for name in ("accuracy_vs_ratio.png", "accuracy_vs_time.png")
             for line in drawn[name]}
    assert lines["full − 2 points"].get_ydata()[0] == pytest.approx(100 * (0.9 - 0.02))
    assert lines["target: full − 2 points"].get_ydata()[0] == pytest.approx(100 * (0.9 - 0.02))
    assert not [label for label in lines if "1.3" in label]


def test_the_default_target_drop_is_the_papers_1_3_points():
    records = [_record("full", 0.0, 0, [0.9], [1.0]), _record("influence", 0.4, 0, [0.89], [0.6])]
    evaluation.add_convergence(records, evaluation.EvalArgs().target_drop)
    summary = evaluation.summarise(records)
    text = evaluation.report_markdown(summary, records, [], evaluation.targets(summary, records), {},
                                      {"dataset": "d", "model": "m"})
    assert "full-data accuracy minus 1.3 points." in text and "(target ≤ 1.3)" in text


def test_a_target_drop_outside_its_range_is_refused_in_one_line(capsys):
    assert main(["evaluate", "--target-drop", "1"]) == 2
    assert capsys.readouterr().err == "dataset-prune: error: --target-drop 1.0: Input should be less than 1\n"


def _commands():
    import argparse

    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _reference_rows() -> dict[tuple[str, str], str]:
    """(command, flag) → the reference table's text of that option."""
    import re

    from flows.cli import options_reference

    rows, command = {}, None
    for line in options_reference().splitlines():
        if line.startswith("#### `dataset-prune "):
            command = line.split()[2].rstrip("`:")
        elif match := re.match(r"\| `(--[a-z-]+)[^`]*` \| (.*) \|$", line):
            rows[command, match[1]] = match[2]
    return rows


def test_the_parser_the_ui_form_and_the_reference_agree_on_every_default():
    """Each option's default is the parameter model's field default (itself the core argument
    object's where there is one): the argparse default, the Prefect UI form's JSON schema (from the
    flows' signatures, as deployments show it) and the generated reference table all say it."""
    from prefect.utilities.callables import parameter_schema

    from flows.cli import shown_default
    from flows.evaluate import evaluate_pruning
    from flows.parameters import EvaluateParameters, RunParameters
    from flows.prune import prune_dataset
    from pruning_core.recipe import EvalArgs, InfluenceArgs, TrainArgs
    from pruning_core.selection import SelectionArgs

    forms = {}
    for flow, model in ((prune_dataset, RunParameters), (evaluate_pruning, EvaluateParameters)):
        schema = parameter_schema(flow).model_dump_for_openapi()
        forms[model] = schema["definitions"][model.__name__]["properties"]
    models = {"run": RunParameters, "select": RunParameters, "evaluate": EvaluateParameters}
    reference = _reference_rows()
    given_only, checked = set(), 0
    for command, parser in _commands().items():
        for action in parser._actions:
            field = getattr(action, "field", None)
            if field is None:
                model = models.get(command)
                assert model is None or action.dest not in model.model_fields or (command, action.dest) == (
                    "select", "out"), f"{command} {action.option_strings}: written by hand, not from its field"
                continue
            model, name = models[command], action.dest
            assert field is model.model_fields[name]
            if action.default is None and field.default is not None:  # the command must know whether it was given
                given_only.add((command, name))
            else:
                assert action.default == field.default, (command, name)
            assert forms[model][name]["default"] == field.default, (command, name)
            text = reference[command, action.option_strings[0]]
            shown = shown_default(field.default)
            assert text.endswith(f"(default: {shown})") if shown else "(default: None)" not in text, (command, name)
            checked += 1
    assert given_only == {("select", "workers"), ("evaluate", "prune_ratio")}
    assert checked > 60
    # the field defaults are the core's, written once
    core = {"lr": TrainArgs.lr, "weight_decay": TrainArgs.weight_decay, "batch_size": TrainArgs.batch_size,
            "model": TrainArgs.model, "scope": InfluenceArgs.scope, "damping": InfluenceArgs.damping,
            "block_size": InfluenceArgs.block_size, "method": SelectionArgs.method, "solver": SelectionArgs.solver,
            "target_drop": EvalArgs.target_drop, "gap_samples": EvalArgs.gap_samples}
    assert {name: EvaluateParameters.model_fields[name].default for name in core} == core
    assert EvaluateParameters.model_fields["ratios"].default == list(EvalArgs.ratios)
    # and so are the choices the form offers
    from pruning_core.recipe import DEFAULT_EPOCHS, FACTORY_PATTERN, STRATEGIES
    from pruning_core.selection import METHODS, SOLVERS

    run_form = forms[RunParameters]
    assert [run_form[name]["enum"] for name in ("hessian", "method", "solver")] == [
        list(STRATEGIES), list(METHODS), list(SOLVERS)]
    # a model: a built-in from the drop-down, or the user's own factory
    assert [{k: v for k, v in option.items() if k != "type"} for option in run_form["model"]["anyOf"]] == [
        {"enum": list(DEFAULT_EPOCHS)}, {"pattern": FACTORY_PATTERN}]
    assert forms[EvaluateParameters]["methods"]["items"]["enum"] == list(METHODS)


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--from-run", "/nonexistent/run", "--prune-ratio", "0.4"], "--prune-ratio with --from-run"),
    (["select", "--scores", "s.parquet", "--prune-ratio", "0.4", "--out", "o.parquet", "--workers", "2"],
     "--workers applies to --solver bucketed"),
])
def test_an_option_given_at_its_default_value_is_still_given(argv, message, capsys):
    """The options whose parser default is None (`given` in flows/cli.py): refused where they do
    not apply even when the value given equals the field's default."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_core_error_names_the_field_and_the_command_line_its_flag(capsys):
    """The Python API and the Prefect UI show a core error with the field's name (as they were
    given it); the command line, and only it, shows the flag. A Dask worker's error pickled back
    keeps its fields."""
    import pickle

    from pruning_core.errors import BadInputError
    from pruning_core.recipe import TrainArgs

    with pytest.raises(BadInputError) as info:
        TrainArgs(epochs=0)
    assert str(info.value) == "epochs 0 must be at least 1"
    assert info.value.as_flags() == "--epochs 0 must be at least 1"
    assert pickle.loads(pickle.dumps(info.value)).as_flags() == "--epochs 0 must be at least 1"
    with pytest.raises(BadInputError) as info:
        TrainArgs(model="linear", weight_decay=0.0)
    assert str(info.value) == "weight_decay must be > 0 for model linear (the optimum must exist)"
    assert main(["run", "--model", "linear", "--weight-decay", "0", "--prune-ratio", "0.4", "--dry-run"]) == 2
    assert capsys.readouterr().err == (
        "dataset-prune: error: --weight-decay must be > 0 for --model linear (the optimum must exist)\n")


def _marked_fields(path) -> set[str]:
    """The fields named (`name`) in the string literals of a module, its docstrings left out."""
    import ast
    import re

    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return {match[1] for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings for match in re.finditer(r"`([a-z][a-z0-9_]*)`", node.value)}


def test_every_field_an_error_names_is_an_option():
    """A field named in a message (`prune_ratio`) is a parameter of the flows or an option of
    `select`, `versions` or `export`, so that the UI shows a real field and the command line a real flag."""
    from pathlib import Path

    from flows.parameters import EvaluateParameters, RunParameters

    root = Path(__file__).resolve().parents[1]
    options = {action.dest for command in ("select", "versions", "export") for action in _commands()[command]._actions}
    known = {*RunParameters.model_fields, *EvaluateParameters.model_fields, *options}
    not_errors = {"evaluation.py": {"influence"}}  # the report's Markdown, where backticks mark code
    modules = [*sorted((root / "pruning_core").glob("*.py")), root / "flows" / "parameters.py",
               root / "flows" / "preflight.py"]
    named = {path.name: _marked_fields(path) - not_errors.get(path.name, set()) for path in modules}
    assert {name: fields - known for name, fields in named.items() if fields - known} == {}
    assert {"epochs", "prune_ratio", "target", "dask_address"} <= set().union(*named.values())


def test_a_worker_s_dataset_error_names_the_flag_on_the_command_line(tmp_path):
    """A worker's reason for not opening the data keeps its field marked, so the run's refusal
    (which quotes it) names `--data-root` on the command line and `data_root` elsewhere."""
    from flows.preflight import worker_problem
    from pruning_core.errors import BadInputError
    from pruning_core.pipeline import worker_view

    view = worker_view("fashion-mnist", "/nx", str(tmp_path / ".workers-probe"))  # a short path: not cut
    refusal = BadInputError(worker_problem(view, "fashion-mnist", "0" * 64, "t0k3n", tmp_path))
    assert "; set --data-root to the folder holding the idx files)" in refusal.as_flags()
    assert "; set data_root to the folder holding the idx files)" in str(refusal)
