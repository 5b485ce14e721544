"""Issue 14, "outputs users can take elsewhere": rem_sr's figures a reader can judge.

Each evaluation run (evaluate.json, through ``python -m monai.bundle run``) leaves the 2D panels of its figure (the
first test case, the same slices for every method) in ``figure_panels.npz``; ``scripts.evaluate.comparison_figure``
(which ``tools/compare_methods.py`` calls per scale) puts every method of one scale side by side, with the LR input,
the HR reference and one shared error colour scale.
"""

from __future__ import annotations

import csv
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import BUNDLES, load_bundle_scripts, run_bundle

METHODS = ("nearest", "trilinear")


@pytest.fixture(scope="module")
def runs(brain_data, tmp_path_factory):
    """evaluate.json of the two weight-free methods at x4 on the synthetic test set (syn3 with a mask, then
    nibabel's anatomical.nii without), in the folder layout of tools/compare_methods.py."""
    root = tmp_path_factory.mktemp("rem_fig")
    folders = {}
    for method in METHODS:
        folders[method] = root / "eval_scale_4" / method
        run_bundle(
            "rem_sr",
            ["train.json", "evaluate.json"],
            {
                "dataset_dir": str(brain_data),
                "datalist": str(brain_data / "datalist.json"),
                "output_dir": str(folders[method]),
                "method": method,
                "eval_scale": 4,
            },
        )
    return root, folders


def _first_psnr_brain(folder) -> float:
    rows = list(csv.DictReader(open(folder / "psnr_brain_raw.csv")))
    return float(rows[0]["class0"])


def test_each_run_saves_the_panels_of_its_first_case(runs, brain_data):
    """The panels are the first case's middle slices in the radiological view: the HR volume, the method's own output
    (for nearest: the degraded volume, bit for bit) and the LR grid; with the case's PSNR from the metric files."""
    _, folders = runs
    evaluate = load_bundle_scripts("rem_sr", "evaluate")
    figures = load_bundle_scripts("rem_sr", "figures")
    degradation = load_bundle_scripts("rem_sr", "degradation")
    hr = nib.load(str(brain_data / "syn3_T1w.nii.gz")).get_fdata(dtype=np.float32)  # RAS, already in [0, 1]
    mask = nib.load(str(brain_data / "syn3_mask.nii.gz")).get_fdata() > 0
    nearest = degradation.degrade(torch.from_numpy(hr)[None], 4, "nearest").clamp(0, 1)[0].numpy()
    lr = degradation.downsample(torch.from_numpy(hr)[None], 4)[0].numpy()
    for method, folder in folders.items():
        panels = evaluate.load_panels(folder / "figure_panels.npz")
        assert (panels["case"], panels["method"], panels["scale"]) == ("syn3", method, 4.0)
        assert panels["region"] == "inside the brain mask"
        assert panels["psnr"] == pytest.approx(_first_psnr_brain(folder), abs=1e-4)
        assert list(panels["hr_shape"]) == [40, 48, 40] and list(panels["lr_shape"]) == [10, 12, 10]
        np.testing.assert_allclose(panels["spacing"], [1, 1, 1])
        np.testing.assert_allclose(panels["lr_spacing"], [4, 4, 4])
        for plane, index in (("axial", 20), ("coronal", 24), ("sagittal", 20)):
            assert int(panels[f"index_{plane}"]) == index
            np.testing.assert_array_equal(panels[f"hr_{plane}"], figures.slice_view(hr, plane, index))
            np.testing.assert_array_equal(panels[f"mask_{plane}"], figures.slice_view(mask, plane, index))
            np.testing.assert_array_equal(panels[f"lr_{plane}"], figures.slice_view(lr, plane, index // 4))
        assert panels["hr_axial"].shape == (48, 40) and panels["lr_axial"].shape == (12, 10)
        assert (folder / f"sr_{method}_x4.png").stat().st_size > 10_000
        assert not list(folder.glob(".partial-*"))
    nearest_panels = evaluate.load_panels(folders["nearest"] / "figure_panels.npz")
    np.testing.assert_allclose(nearest_panels["pred_coronal"], figures.slice_view(nearest, "coronal", 24), atol=1e-6)


def test_comparison_figure_of_two_runs_is_a_readable_png(runs):
    """tools/compare_methods.py's hook writes <grid point>/comparison.png: 4 columns (LR, nearest, trilinear, HR) of
    about 2.35 inches at 120 dpi, an image row and an error row per view and an enlarged detail row, with grey images
    and coloured error maps."""
    import matplotlib.image

    from tools import compare_methods

    root, folders = runs
    results = {"eval_scale_4": {m: {"psnr": {"mean": 0.0}} for m in METHODS}}
    (path,) = compare_methods.comparison_figures(BUNDLES / "rem_sr", root, results)
    assert path == root / "eval_scale_4" / "comparison.png"
    image = matplotlib.image.imread(str(path))
    height, width = image.shape[:2]
    assert 1000 <= width <= 1300, image.shape  # 4 x 2.35 in x 120 dpi = 1128 px
    assert 1000 <= height <= 2600, image.shape  # 5 rows (axial, its error, coronal, its error, detail) plus titles
    rgb = image[..., :3]
    grey = np.abs(rgb - rgb.mean(-1, keepdims=True)).max(-1) < 0.02
    dark = rgb.max(-1) < 0.1
    assert 0.1 < float((grey & ~dark & (rgb.mean(-1) < 0.95)).mean())  # grey-level brain images, not blank
    assert 0.01 < float((~grey).mean()) < 0.5  # coloured error maps and the colour bar
    assert not list(path.parent.glob(".partial-*"))
    evaluate = load_bundle_scripts("rem_sr", "evaluate")
    one = evaluate.comparison_figure(
        {"trilinear": folders["trilinear"]}, root / "one.png", planes=("sagittal",), detail="sagittal"
    )
    assert matplotlib.image.imread(str(one)).shape[1] < width  # fewer methods, fewer columns
    assert evaluate.comparison_figure({}, root / "none.png") is None and not (root / "none.png").exists()


def test_comparison_figure_refuses_runs_it_cannot_compare(runs, tmp_path):
    """Runs of another scale (or case) are refused with the files named; a run without panels names its file."""
    _, folders = runs
    evaluate = load_bundle_scripts("rem_sr", "evaluate")
    other = tmp_path / "x2"
    other.mkdir()
    with np.load(folders["trilinear"] / "figure_panels.npz") as npz:
        panels = {k: npz[k] for k in npz.files}
    np.savez(other / "figure_panels.npz", **{**panels, "scale": np.asarray(2.0)})
    with pytest.raises(evaluate.BundleInputError, match=r"show different cases, scales or slices") as err:
        evaluate.comparison_figure({"nearest": folders["nearest"], "trilinear": other}, tmp_path / "c.png")
    assert str(other / "figure_panels.npz") in str(err.value)
    empty = tmp_path / "empty"
    shutil.copytree(folders["nearest"], empty, ignore=shutil.ignore_patterns("*.npz"))
    with pytest.raises(evaluate.BundleInputError, match="figure panels not found"):
        evaluate.comparison_figure({"nearest": empty}, tmp_path / "d.png")
    assert not (tmp_path / "c.png").exists() and not (tmp_path / "d.png").exists()
