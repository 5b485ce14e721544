"""tools/compare_methods.py: reading MONAI MetricsSaver files, the table, and the metadata's eval_metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.handlers.utils import write_metrics_reports

from tools import compare_methods as cm

ROOT = Path(__file__).resolve().parents[1]


def _saver_files(folder: Path, details: dict[str, np.ndarray]) -> None:
    """What MetricsSaver writes for `details` ({metric: [cases, classes]})."""
    write_metrics_reports(
        save_dir=str(folder),
        images=[f"case{i}" for i in range(len(next(iter(details.values()))))],
        metrics={k: float(np.nanmean(v)) for k, v in details.items()},
        metric_details={k: torch.as_tensor(v) for k, v in details.items()},
        summary_ops="*",
        deli=",",
    )


def test_read_metrics_takes_the_mean_and_the_std_over_cases(tmp_path):
    dice = np.array([[0.8, 0.6], [0.9, 0.7]])  # 2 cases, 2 labels: per-case means 0.7 and 0.8
    _saver_files(tmp_path, {"dice": dice, "seconds": np.array([[1.0], [3.0]])})
    metrics = cm.read_metrics(tmp_path)
    assert list(metrics) == ["dice", "seconds"]
    assert metrics["dice"]["mean"] == pytest.approx(0.75)
    assert metrics["dice"]["std"] == pytest.approx(0.05)
    assert metrics["seconds"]["std"] == pytest.approx(1.0)


def test_read_metrics_without_output_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="metrics.csv not found"):
        cm.read_metrics(tmp_path)


def test_markdown_has_a_row_per_metric_and_reports_untrained_methods():
    results = {
        "all": {
            "identity": {"dice": {"mean": 0.6, "std": 0.01}, "hd95": {"mean": 12.345, "std": 1.0}},
            "cascade": {"dice": {"mean": 0.66, "std": float("nan")}, "hd95": {"mean": 9.0, "std": 0.5}},
            "no_aux": cm.NOT_TRAINED,
        }
    }
    table = cm.markdown(results, ["identity", "cascade", "no_aux"], "python tools/compare_methods.py x")
    assert "| metric | identity | cascade | no_aux |" in table
    assert "| dice | 0.6000 ± 0.0100 | 0.6600 | not trained |" in table
    assert "| hd95 | 12.35 ± 1.00 | 9.0000 ± 0.5000 | not trained |" in table


def test_grid_points_cover_every_combination():
    assert cm.grid_points(None) == [{}]
    assert cm.grid_points({"eval_scale": [2, 4]}) == [{"eval_scale": 2}, {"eval_scale": 4}]
    assert cm.point_label({"eval_scale": 4}) == "eval_scale_4"
    assert cm.point_label({"eval_scale": [1, 1, 4]}) == "eval_scale_1x1x4"


@pytest.mark.parametrize("bundle", ["rem_sr", "refdrn", "f3rnet_ct_mri"])
def test_set_eval_metrics_changes_only_that_block(bundle):
    text = (ROOT / "bundles" / bundle / "configs" / "metadata.json").read_text()
    out = cm.set_eval_metrics(text, {"dice": 0.66213, "hd95_eval_scale_4": 3.5})
    assert json.loads(out)["eval_metrics"] == {"dice": 0.66213, "hd95_eval_scale_4": 3.5}
    before, after = json.loads(text), json.loads(out)
    before.pop("eval_metrics"), after.pop("eval_metrics")
    assert before == after
    # lines outside the block keep their layout
    assert [line for line in out.splitlines() if "eval_metrics" not in line and ":" in line and "{" not in line][
        :3
    ] == [line for line in text.splitlines() if "eval_metrics" not in line and ":" in line and "{" not in line][:3]


def test_fmt_handles_missing_values():
    assert cm.fmt({"mean": float("nan"), "std": 0.0}) == "n/a"
    assert cm.fmt({"mean": 0.5, "std": float("nan")}) == "0.5000"
    assert cm.fmt({"mean": 20.6412, "std": 0.0}) == "20.64"


def test_linear_bound_tool_prints_one_row_per_input(brain_data, capsys):
    """tools/linear_sr_bound.py on the synthetic brains: a row per degradation, and the filter fitted to x2 beats the
    trilinear input it filters on a volume it was not fitted on."""
    from tools import linear_sr_bound

    assert linear_sr_bound.main(["--data", str(brain_data), "--radius", "1", "--samples", "2000", "--joint"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split("|")[1:-1] for line in lines[lines.index("|---|---|---|---|---|") + 1 :]]
    assert [r[0].strip() for r in rows] == ["x2", "x4", "1x1x4"]
    trilinear, own, joint = (float(rows[0][i]) for i in (1, 3, 4))
    assert own > trilinear and joint > 0


def test_generalisation_gains_and_ratio():
    from tools import generalisation

    entry = lambda d: {"dice": {"mean": d}}  # noqa: E731
    results = {
        "in": {"identity": entry(0.5), "a": entry(0.7), "b": "not trained"},
        "out": {"identity": entry(0.4), "a": entry(0.5), "b": "not trained"},
    }
    table = generalisation.gains(results, ["identity", "a", "b"], ["in", "out"], "in", "out")
    assert table["a"]["in"]["gain"] == pytest.approx(0.2) and table["a"]["out"]["gain"] == pytest.approx(0.1)
    assert table["a"]["ratio"] == pytest.approx(0.5)
    assert table["b"]["ratio"] is None and table["b"]["in"]["dice"] is None
    assert table["identity"]["ratio"] is None  # no gain over itself
    text = generalisation.markdown(table, ["identity", "a", "b"], ["in", "out"], {"in": "training family"}, "cmd")
    assert "| method | training family | out | held-out gain / in-distribution gain |" in text
    assert "| a | 0.7000 (+0.2000) | 0.5000 (+0.1000) | 0.50 |" in text
    assert "| b | not trained | not trained | n/a |" in text


@pytest.mark.parametrize("bundle_name", ["refdrn", "f3rnet_ct_mri"])
def test_generalisation_spec_names_known_methods_and_sets(bundle_name):
    from tools import compare_methods

    root = compare_methods.ROOT / "bundles" / bundle_name
    spec, defined, weights = compare_methods.resolve(root, {}, "generalisation", "methods", "method_weights")
    assert spec["in_distribution"] in spec["sets"] and spec["heldout"] in spec["sets"]
    # every network of the table is a method evaluate.json defines (refdrn: methods; f3rnet: method_weights)
    assert spec["methods"][0] == "identity" and set(spec["methods"]) <= set(defined or weights)


def test_generalisation_card_refuses_partial_tables_before_running(tmp_path):
    from tools import generalisation

    out = tmp_path / "gen"
    for extra in (["--set", "num_classes=5"], ["--sets", "heldout"]):
        with pytest.raises(SystemExit, match="--card needs every set on the default data"):
            generalisation.main(["refdrn", "--card", "--output_dir", str(out), *extra])
    assert not out.exists()  # nothing was evaluated or written
