"""configs/evaluate.json (an override of train.json) end to end through MONAI's bundle runner on tiny synthetic
pairs, on CPU: one method per run, every method of the model card's table through tools/compare_methods.py (the
untrained one reported as "not trained"), MetricsSaver's per-case files and summaries, the figure, the identity
baseline against reference Dice/NCC, and the clear errors that stop a run before it writes anything."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, make_pair_dataset, run_bundle

TINY_NET = {"fdrn_channels": [4, 8, 8], "fdrn_num_res": 1}
EVAL_METRICS = {"dice", "hd95", "asd", "ncc", "folding_percent", "sdlogj", "input_psnr", "input_ssim", "seconds"}
TINY_EVAL = {**TINY_NET, "num_classes": 5}  # the synthetic pairs have label ids 0..4


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pair_dataset(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def eval_weights(tmp_path_factory):
    """Untrained tiny FDRN weights as models/model.pt and models/backbone_x4.pt (the plain backbone's weights have
    the same keys: REM is not part of the state dict), VoxelMorph weights as models/model_revoxelmorph.pt; no
    models/model_no_aux.pt nor model_voxelmorph_lr.pt. The flow head's bias shifts every pair by about 1.5 voxels,
    so a run that did not load the weights would be seen."""
    networks = load_bundle_scripts("refdrn", "networks")
    ckpt = tmp_path_factory.mktemp("refdrn_eval_models")
    torch.manual_seed(0)
    state = networks.build_registration_network("fdrn", None, **TINY_NET).state_dict()
    state["backbone.flow.bias"] = torch.tensor([1.5, -1.5, 1.5])
    torch.save(state, ckpt / "model.pt")
    torch.save(state, ckpt / "backbone_x4.pt")
    torch.save(networks.build_registration_network("voxelmorph", None).state_dict(), ckpt / "model_revoxelmorph.pt")
    return ckpt


@pytest.fixture(scope="module")
def compared(eval_weights, pairs, tmp_path_factory):
    """tools/compare_methods.py over evaluate.json's compare_methods: one evaluate run per method."""
    from tools import compare_methods

    out = tmp_path_factory.mktemp("refdrn_compare")
    overrides = {**TINY_EVAL, "dataset_dir": str(pairs), "ckpt_dir": str(eval_weights)}
    args = [
        "refdrn",
        "--output_dir",
        str(out),
        "--threads",
        "1",
        "--set",
        *[f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()],
    ]
    assert compare_methods.main(args) == 0
    return out, json.loads((out / "comparison.json").read_text())["all"]


def test_evaluate_reports_every_method_and_every_metric(compared):
    _, results = compared
    assert list(results) == ["identity", "backbone_lr", "cascade", "cascade_io", "io_from_identity", "cascade_no_aux"]
    assert results["cascade_no_aux"] == "not trained"
    for method in ("identity", "backbone_lr", "cascade", "cascade_io", "io_from_identity"):
        assert set(results[method]) == EVAL_METRICS, method
        assert results[method]["dice"]["cases"] == 2
    identity = results["identity"]
    assert identity["folding_percent"]["mean"] == 0 and identity["sdlogj"]["mean"] == 0
    assert results["backbone_lr"]["input_psnr"]["mean"] == pytest.approx(identity["input_psnr"]["mean"])  # no REM
    assert results["cascade"]["input_psnr"]["mean"] != pytest.approx(identity["input_psnr"]["mean"])  # REM's output
    for method in ("backbone_lr", "cascade"):  # the shipped weights were loaded: a ~1.5 voxel shift, no folding
        assert results[method]["dice"]["mean"] < identity["dice"]["mean"] - 0.02, method
        assert results[method]["hd95"]["mean"] > identity["hd95"]["mean"], method
        assert results[method]["folding_percent"]["mean"] == 0, method
        assert results[method]["seconds"]["mean"] > 0, method
    # instance optimisation: the rows "network + IO" and "IO from identity" register with the SR images (REM kept),
    # IO takes back part of the network's shift, and its time is in the row's time per pair
    for method in ("cascade_io", "io_from_identity"):
        assert results[method]["input_psnr"]["mean"] == pytest.approx(results["cascade"]["input_psnr"]["mean"])
        assert results[method]["folding_percent"]["mean"] < 0.5, method
        assert results[method]["seconds"]["mean"] > results["cascade"]["seconds"]["mean"], method
    assert results["cascade_io"]["dice"]["mean"] > results["cascade"]["dice"]["mean"]


def test_evaluate_writes_per_case_metrics_and_the_figure(compared):
    out, _ = compared
    run = out / "all" / "cascade"
    for metric in EVAL_METRICS:
        raw = list(csv.reader(open(run / f"{metric}_raw.csv")))
        assert raw[0][0] == "filename" and raw[0][-1] == "mean", metric
        assert sorted(r[0] for r in raw[1:]) == ["sub2_to_sub3", "sub3_to_sub2"], metric  # the datalist names
        summary = list(csv.reader(open(run / f"{metric}_summary.csv")))
        assert summary[0] == ["class", "mean", "median", "max", "min", "90percentile", "std", "notnans"]
    assert len(next(csv.reader(open(run / "dice_raw.csv")))) == 1 + 4 + 1  # labels 1..4, then the mean
    assert (run / "registration_cascade.png").stat().st_size > 10_000
    assert (out / "all" / "identity" / "registration_identity.png").is_file()
    for method in ("identity", "backbone_lr", "cascade"):  # each run's panels, drawn across methods by the tool
        assert (out / "all" / method / "figure_panels.npz").is_file(), method
    assert (out / "all" / "comparison.png").stat().st_size > 20_000
    assert not list(out.rglob(".partial-*"))


def _case_values(run, metric: str) -> dict[str, float]:
    return {r[0]: float(r[-1]) for r in list(csv.reader(open(run / f"{metric}_raw.csv")))[1:]}


def test_evaluate_identity_matches_reference_dice_and_ncc(compared, pairs):
    """No registration: the warped moving label and image are the moving ones, so MONAI's Dice must equal the
    bundle's joint-histogram Dice of the two label maps, and the NCC the NCC of the two HR images."""
    mean_label_dice = load_bundle_scripts("refdrn", "metrics").mean_label_dice
    global_ncc = load_bundle_scripts("refdrn", "registration_metrics").global_ncc
    out, _ = compared
    run = out / "all" / "identity"
    dice, ncc = _case_values(run, "dice"), _case_values(run, "ncc")
    for item in json.loads((pairs / "datalist.json").read_text())["test"]:
        moving_label, fixed_label, moving, fixed = (
            np.asarray(nib.load(str(pairs / item[key])).dataobj)
            for key in ("moving_label", "fixed_label", "moving_image", "fixed_image")
        )
        assert dice[item["name"]] == pytest.approx(mean_label_dice(moving_label, fixed_label), abs=1e-6)
        assert ncc[item["name"]] == pytest.approx(global_ncc(moving, fixed), abs=1e-5)


def test_evaluate_shows_progress_and_the_metrics(pairs, tmp_path):
    result = run_bundle(
        "refdrn",
        ["train.json", "evaluate.json"],
        {**TINY_EVAL, "method": "identity", "dataset_dir": str(pairs), "output_dir": str(tmp_path / "eval")},
    )
    assert "Iteration: [1/2]" in result.stderr  # the progress bar
    assert "dice: " in result.stdout + result.stderr and "hd95: " in result.stdout + result.stderr
    assert float(next(r for r in csv.reader(open(tmp_path / "eval" / "metrics.csv")) if r[0] == "dice")[1]) > 0


@pytest.mark.parametrize("case", ["not_trained", "wrong_weights", "unknown_method"])
def test_evaluate_refuses_bad_methods_and_weights_without_writing(eval_weights, pairs, tmp_path, case):
    overrides = {
        **TINY_EVAL,
        "dataset_dir": str(pairs),
        "ckpt_dir": str(eval_weights),
        "output_dir": str(tmp_path / "eval"),
    }
    if case == "not_trained":
        overrides["method"] = "cascade_no_aux"
        expected = [str(eval_weights / "model_no_aux.pt"), "weights file not found"]
    elif case == "wrong_weights":  # the tiny weights against the default (larger) FDRN
        overrides = {k: v for k, v in overrides.items() if k not in TINY_NET}
        expected = [str(eval_weights / "model.pt"), "weights do not match"]
    else:
        overrides["method"] = "cascade_x"
        expected = [
            "unknown --method 'cascade_x'; choose one of identity, backbone_lr, cascade, cascade_io, io_from_identity, "
            "cascade_no_aux"
        ]
    result = run_bundle("refdrn", ["train.json", "evaluate.json"], overrides, check=False)
    assert result.returncode != 0
    assert all(text in result.stderr for text in expected), result.stderr[-3000:]
    assert not (tmp_path / "eval").exists()


def test_generalisation_table_over_the_three_test_sets(eval_weights, pairs, tmp_path):
    """tools/generalisation.py: evaluate.json's generalisation sets (here the tiny test pairs stand in for the
    synthetic ones), the Dice gain over identity per set and the held-out / in-distribution ratio."""
    from tools import generalisation

    for name in ("datalist_synth_train.json", "datalist_synth_heldout.json"):
        (pairs / name).write_text((pairs / "datalist.json").read_text())
    out = tmp_path / "gen"
    overrides = {**TINY_EVAL, "dataset_dir": str(pairs), "ckpt_dir": str(eval_weights)}
    args = ["refdrn", "--methods", "cascade", "revoxelmorph", "voxelmorph_lr", "--output_dir", str(out)]
    args += ["--threads", "1"]
    args += ["--set", *[f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]]
    assert generalisation.main(args) == 0
    table = json.loads((out / "generalisation.json").read_text())
    assert table["sets"] == ["real", "synthetic", "heldout"]
    rows = table["methods"]
    # the table holds every method of evaluate.json's generalisation (identity first), run or not
    assert list(rows)[:3] == ["identity", "backbone_lr", "cascade"] and "voxelmorph_lr" in rows
    assert rows["backbone_lr"]["real"]["dice"] is None  # not run here
    for name in table["sets"]:
        assert (out / name / "comparison.json").is_file()
        assert rows["identity"][name]["gain"] == 0
        # the same pairs in every set: the same Dice
        assert rows["cascade"][name]["dice"] == pytest.approx(rows["cascade"]["real"]["dice"])
        assert rows["cascade"][name]["gain"] < 0  # the tiny weights shift every pair
        assert rows["voxelmorph_lr"][name]["dice"] is None
        assert rows["revoxelmorph"][name]["dice"] is not None  # the VoxelMorph backbone behind REM, evaluated
    assert rows["cascade"]["ratio"] is None  # no positive in-distribution gain to compare with
    text = (out / "generalisation.md").read_text()
    assert "| voxelmorph_lr | not trained | not trained | not trained | n/a |" in text
    # a later call with another method adds its column runs to the same table; --table_only runs nothing
    assert generalisation.main([*args[:1], "--methods", "backbone_lr", *args[5:]]) == 0
    rows = json.loads((out / "generalisation.json").read_text())["methods"]
    assert rows["backbone_lr"]["real"]["dice"] is not None and rows["cascade"]["real"]["dice"] is not None
    before = sorted(p.stat().st_mtime for p in out.rglob("metrics.csv"))
    assert generalisation.main([*args[:1], "--table_only", *args[5:]]) == 0
    assert sorted(p.stat().st_mtime for p in out.rglob("metrics.csv")) == before


def test_compare_grid_given_on_the_command_line_sweeps_io_iterations(pairs, tmp_path):
    """tools/compare_methods.py --set compare_grid=... sweeps a setting for a bundle whose evaluate.json has no grid
    (the instance-optimisation budget here); the grid is the tool's, never passed to the runs."""
    from tools import compare_methods

    out = tmp_path / "sweep"
    overrides = {**TINY_EVAL, "dataset_dir": str(pairs), "compare_grid": {"io_iterations": [[1, 1], [3, 2]]}}
    args = ["refdrn", "--methods", "io_from_identity", "--output_dir", str(out), "--threads", "1", "--set"]
    args += [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
    assert compare_methods.main(args) == 0
    results = json.loads((out / "comparison.json").read_text())
    assert list(results) == ["io_iterations_1x1", "io_iterations_3x2"]
    short, longer = (results[k]["io_from_identity"]["sdlogj"]["mean"] for k in results)
    assert short > 0 and longer != pytest.approx(short)  # each point ran its own number of IO iterations
