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
