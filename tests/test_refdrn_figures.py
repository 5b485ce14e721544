"""Issue 14: refdrn's registration figures.

Each evaluation run (``train.json`` + ``evaluate.json``, MONAI's bundle runner, in-process) leaves the first pair's
2D panels as ``figure_panels.npz`` beside ``registration_<method>.png``; ``scripts.evaluate.comparison_figure`` draws
the same pair across methods from them. Tiny synthetic pairs (32x40x32, 1 mm) and untrained tiny FDRN weights whose
flow bias shifts every voxel by (+1.5, -1.5, +1.5) voxels, so the DDF panels have a known direction.
"""

from __future__ import annotations

import csv
import struct

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, make_pair_dataset
from tests.user_files import datalist, run_in_process, stored_as

TINY_NET = {"fdrn_channels": [4, 8, 8], "fdrn_num_res": 1}
TINY_EVAL = {**TINY_NET, "num_classes": 5}
SHAPE = (32, 40, 32)  # X, Y, Z of the RAS pairs
# displayed [rows, cols] per plane: axial rows = Y, cols = X; coronal rows = Z, cols = X
VIEW_SHAPES = {"axial": (40, 32), "coronal": (32, 32)}
PANELS = ("fixed", "moving", "warped", "fixed_label", "moving_label", "warped_label", "ddf_row", "ddf_col", "jacobian")
BIAS = (1.5, -1.5, 1.5)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pair_dataset(tmp_path_factory.mktemp("pairs"), shape=SHAPE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    networks = load_bundle_scripts("refdrn", "networks")
    ckpt = tmp_path_factory.mktemp("refdrn_fig_models")
    torch.manual_seed(0)
    state = networks.build_registration_network("fdrn", None, **TINY_NET).state_dict()
    state["backbone.flow.bias"] = torch.tensor(BIAS)
    torch.save(state, ckpt / "backbone_x4.pt")
    return ckpt


def _evaluate(method: str, out, pairs, weights, **extra):
    run_in_process(
        "refdrn",
        ["train.json", "evaluate.json"],
        **TINY_EVAL,
        method=method,
        dataset_dir=str(pairs),
        ckpt_dir=str(weights),
        output_dir=str(out),
        **extra,
    )
    return out


@pytest.fixture(scope="module")
def runs(pairs, weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("refdrn_fig_runs")
    return {m: _evaluate(m, root / m, pairs, weights) for m in ("identity", "backbone_lr")}


def _panels(run) -> dict:
    with np.load(run / "figure_panels.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_evaluation_writes_the_panels_of_the_first_pair(runs):
    panels = _panels(runs["backbone_lr"])
    for plane, shape in VIEW_SHAPES.items():
        for name in PANELS:
            assert panels[f"{plane}_{name}"].shape == shape, (plane, name)
        assert panels[f"{plane}_fixed_label"].dtype == np.int32
        assert float(panels[f"{plane}_aspect"]) == 1.0
    assert int(panels["axial_index"]) == SHAPE[2] // 2 and int(panels["coronal_index"]) == SHAPE[1] // 2
    np.testing.assert_allclose(panels["spacing"], [1.0, 1.0, 1.0])
    assert str(panels["name"]) == "sub3_to_sub2" and str(panels["method"]) == "backbone_lr"
    assert float(panels["scale"]) == 4.0
    # the case values are the first row of MetricsSaver's per-case files
    for metric in ("dice", "hd95", "folding_percent"):
        rows = list(csv.reader(open(runs["backbone_lr"] / f"{metric}_raw.csv")))
        assert rows[1][0] == "sub3_to_sub2"
        assert float(panels[metric]) == pytest.approx(float(rows[1][-1]), rel=1e-5, abs=1e-6), metric
    assert (runs["backbone_lr"] / "registration_backbone_lr.png").stat().st_size > 20_000
    assert not list(runs["backbone_lr"].rglob(".partial-*"))


def test_panels_follow_the_view_convention_and_the_ddf(runs):
    """Identity: the warped panel is the moving one, det J = 1. The shifted backbone: +1.5 voxels along x (towards
    the patient's right) is a move to the image's left in the axial view (negative columns), -1.5 along y (towards
    posterior) a move down (positive rows)."""
    identity = _panels(runs["identity"])
    np.testing.assert_allclose(identity["axial_warped"], identity["axial_moving"], atol=1e-6)
    np.testing.assert_array_equal(identity["axial_warped_label"], identity["axial_moving_label"])
    np.testing.assert_allclose(identity["coronal_jacobian"], 1.0)
    assert not np.any(identity["axial_ddf_row"]) and float(identity["folding_percent"]) == 0
    shifted = _panels(runs["backbone_lr"])
    assert np.median(shifted["axial_ddf_col"]) == pytest.approx(-BIAS[0], abs=0.3)
    assert np.median(shifted["axial_ddf_row"]) == pytest.approx(-BIAS[1], abs=0.3)
    assert np.median(shifted["coronal_ddf_row"]) == pytest.approx(-BIAS[2], abs=0.3)
    assert not np.allclose(shifted["axial_warped"], shifted["axial_moving"])


def test_panels_do_not_depend_on_the_storage_orientation(runs, pairs, tmp_path):
    """The figure views assume RAS arrays: the pair stored LPS gives the same panels (evaluation reorients)."""
    item = {"name": "sub3_to_sub2"}
    for role, sub in (("moving", 3), ("fixed", 2)):
        item[f"{role}_image"] = stored_as(pairs / f"sub{sub}_T1w.nii.gz", tmp_path / f"{role}.nii.gz", "LPS")
        item[f"{role}_label"] = stored_as(pairs / f"sub{sub}_labels.nii.gz", tmp_path / f"{role}_lab.nii.gz", "LPS")
    assert "".join(nib.aff2axcodes(nib.load(item["fixed_image"]).affine)) == "LPS"
    dl = datalist(tmp_path / "dl.json", [item])
    lps = _panels(_evaluate("identity", tmp_path / "eval", pairs, tmp_path, datalist=dl))
    ras = _panels(runs["identity"])
    for plane in VIEW_SHAPES:
        for name in ("fixed", "moving", "fixed_label", "moving_label"):
            np.testing.assert_allclose(lps[f"{plane}_{name}"], ras[f"{plane}_{name}"], atol=1e-6)


def test_comparison_figure_of_two_runs(runs, tmp_path):
    evaluate = load_bundle_scripts("refdrn", "evaluate")
    path = evaluate.comparison_figure(runs, tmp_path / "cmp" / "comparison.png")
    assert path == tmp_path / "cmp" / "comparison.png"
    width, height = _png_size(path)
    # fixed, moving and two method columns of 1.6 inch at 150 dpi; three rows
    assert 900 <= width <= 1300 and 700 <= height <= 1300, (width, height)
    assert evaluate.comparison_figure({"x": tmp_path / "nowhere"}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_comparison_figure_refuses_runs_of_different_cases(runs, tmp_path):
    evaluate = load_bundle_scripts("refdrn", "evaluate")
    other = _panels(runs["identity"])
    other["name"] = np.asarray("another_case")
    evaluate.save_panels(other, tmp_path / "other" / "figure_panels.npz")
    with pytest.raises(ValueError, match="different cases"):
        evaluate.comparison_figure({**runs, "other_method": tmp_path / "other"}, tmp_path / "c.png")


def test_figure_panels_aspect_shapes_and_refusals():
    """Anisotropic voxels give the panels their physical aspect; volumes on different grids, a DDF that is not
    [3, X, Y, Z] and non-RAS volumes are refused."""
    from monai.data import MetaTensor

    evaluate = load_bundle_scripts("refdrn", "evaluate")
    rng = np.random.default_rng(0)
    image = rng.random((6, 8, 10)).astype(np.float32)
    labels = rng.integers(0, 3, (6, 8, 10))
    ddf = np.zeros((3, 6, 8, 10), np.float32)
    panels = evaluate.figure_panels(image, image, image, labels, labels, labels, ddf, spacing=(1.0, 2.0, 3.0))
    assert panels["axial_fixed"].shape == (8, 6) and float(panels["axial_aspect"]) == 2.0  # rows y (2 mm), cols x
    assert panels["coronal_fixed"].shape == (10, 6) and float(panels["coronal_aspect"]) == 3.0
    np.testing.assert_allclose(panels["axial_jacobian"], 1.0)
    with pytest.raises(ValueError, match="one grid"):
        evaluate.figure_panels(image, image[:-1], image, labels, labels, labels, ddf)
    with pytest.raises(ValueError, match="one grid"):
        evaluate.figure_panels(image, image, image, labels, labels, labels, ddf[:2])
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    assert evaluate._ras_spacing(MetaTensor(torch.zeros(1, 6, 8, 10), affine=affine)) == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="RAS-oriented.*got LPS"):
        evaluate._ras_spacing(MetaTensor(torch.zeros(1, 6, 8, 10), affine=np.diag([-1.0, -2.0, 3.0, 1.0])))
