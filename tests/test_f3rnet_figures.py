"""The f3rnet_ct_mri evaluation's figures and per-organ metrics (configs/evaluate.json over train.json).

A tiny phantom test pair (tools/make_abdomen_phantoms.py at 36x40x32, RAS, 1 mm) is evaluated twice: ``identity``
through ``python -m monai.bundle run``, and with a known linear DDF (in-process ``monai.bundle.run``, the function
behind the command). Checked: ``metrics.csv`` names every organ once per measure (right and left kidney apart),
``figure_panels.npz`` holds the first pair's panels in radiological view with the patient's right kidney on the
image's left, the per-organ Dice of the panels equals the MetricsSaver values, every panel carries its orientation
letters, and ``comparison_figure`` draws the two runs.
"""

from __future__ import annotations

import csv
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, run_bundle
from tests.user_files import run_in_process
from tools import make_abdomen_phantoms

SHAPE = (36, 40, 32)
TINY_NET = {"fr_channels": 4, "ms_channels": 8}
EVALUATE = ["train.json", "evaluate.json"]
# label id -> metric suffix; ids as in Learn2Reg and the phantoms (3 = the patient's right kidney)
ORGANS = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
METRICS = [
    "dice",
    *[f"dice_{o}" for o in ORGANS.values()],
    "asd",
    *[f"asd_{o}" for o in ORGANS.values()],
    "hd95",
    *[f"hd95_{o}" for o in ORGANS.values()],
    "folding_percent",
    "sdlogj",
    "seconds",
]
SCALE = 0.2  # LinearDDF: u_x = SCALE * i, so det J = 1 + SCALE everywhere


class LinearDDF(torch.nn.Module):
    """A test network: the DDF ``u_x(i, j, k) = SCALE * i`` (towards the patient's right), ``u_y = u_z = 0``."""

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        ddf = pair.new_zeros((pair.shape[0], 3, *pair.shape[2:]))
        ddf[:, 0] = SCALE * torch.arange(pair.shape[2], dtype=pair.dtype)[:, None, None]
        return ddf


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The phantom folder and the two evaluation runs of its one test pair (case003)."""
    root = tmp_path_factory.mktemp("f3rnet_figures")
    data = root / "phantoms"
    make_abdomen_phantoms.main(["--out", str(data), "--n-subjects", "4", "--shape", *map(str, SHAPE)])
    common = {**TINY_NET, "dataset_dir": str(data), "warmup": "False"}
    run_bundle("f3rnet_ct_mri", EVALUATE, {**common, "method": "identity", "output_dir": str(root / "identity")})
    with warnings.catch_warnings():  # the field moves some labels out of the volume: MONAI's empty-mask warnings
        warnings.simplefilter("ignore")
        run_in_process(
            "f3rnet_ct_mri",
            EVALUATE,
            **common,
            method="identity",
            network={"_target_": "tests.test_f3rnet_figures.LinearDDF"},
            output_dir=str(root / "linear"),
        )
    return data, {"identity": root / "identity", "linear": root / "linear"}


def _metrics(run) -> list[tuple[str, float]]:
    return [(row[0], float(row[1])) for row in csv.reader((run / "metrics.csv").read_text().splitlines())]


def _first_case(run, metric: str) -> float:
    rows = list(csv.DictReader((run / f"{metric}_raw.csv").read_text().splitlines()))
    assert rows[0]["filename"] == "case003"
    return float(rows[0]["mean"])


def test_metrics_name_each_organ_once(runs):
    _, folders = runs
    for run in folders.values():
        names = [name for name, _ in _metrics(run)]
        assert names == METRICS  # each organ once per measure, no kidney group, no name twice
        values = dict(_metrics(run))
        organ_dice = [values[f"dice_{o}"] for o in ORGANS.values()]
        assert values["dice"] == pytest.approx(np.mean(organ_dice), abs=1e-6)  # the mean over the four organs
        # the per-organ files hold one organ each (MetricsSaver: class0 only)
        header = (run / "dice_kidney_right_raw.csv").read_text().splitlines()[0]
        assert header == "filename,class0,mean"
    identity = dict(_metrics(folders["identity"]))
    assert identity["dice_kidney_right"] != identity["dice_kidney_left"]


def test_figure_panels_hold_the_first_pair_in_radiological_view(runs):
    data, folders = runs
    figure_panels = load_bundle_scripts("f3rnet_ct_mri", "figure_panels")
    registration_metrics = load_bundle_scripts("f3rnet_ct_mri", "registration_metrics")
    figures = load_bundle_scripts("f3rnet_ct_mri", "figures")
    x, y, z = SHAPE
    shapes = {"axial": (y, x), "coronal": (z, x)}
    names = [f"{p}_{n}" for p in shapes for n in figure_panels.PLANE_ARRAYS]
    expected_keys = {
        *names,
        "axial_index",
        "coronal_index",
        "organ_ids",
        "organ_names",
        "spacing",
        "planes",
        "dice",
        "dice_before",
        "folding_percent",
        "case",
        "method",
        "method_title",
        "direction",
        "fixed_modality",
        "moving_modality",
    }
    for run in folders.values():  # the command-line run (identity) and the in-process one
        with np.load(run / "figure_panels.npz", allow_pickle=False) as npz:
            assert set(npz.files) == expected_keys
            for name in names:
                assert npz[name].shape == shapes[name.split("_")[0]], name
            assert npz["axial_fixed"].dtype == np.float32 and npz["axial_fixed_label"].dtype == np.int16
    panels = figure_panels.load_panels(folders["linear"] / "figure_panels.npz")
    assert str(panels["case"]) == "case003" and str(panels["fixed_modality"]) == "MR"
    assert panels["organ_ids"].tolist() == [1, 2, 3, 4]
    assert panels["organ_names"].tolist() == ["liver", "spleen", "right kidney", "left kidney"]
    assert panels["spacing"].tolist() == [1.0, 1.0, 1.0]

    # the label slices are the fixed / moving label files (stored RAS) in radiological view
    fixed_label = np.asarray(nib.load(str(data / "labels" / "case003_mr_label.nii.gz")).dataobj)
    moving_label = np.asarray(nib.load(str(data / "labels" / "case003_ct_label.nii.gz")).dataobj)
    assert "".join(nib.aff2axcodes(nib.load(str(data / "labels" / "case003_mr_label.nii.gz")).affine)) == "RAS"
    k = int(panels["axial_index"])
    np.testing.assert_array_equal(panels["axial_fixed_label"], fixed_label[:, :, k].T[::-1, ::-1])
    np.testing.assert_array_equal(panels["axial_moving_label"], moving_label[:, :, k].T[::-1, ::-1])
    j = int(panels["coronal_index"])
    np.testing.assert_array_equal(panels["coronal_fixed_label"], fixed_label[:, j, :].T[::-1, ::-1])
    # the patient's right kidney (label 3, at +x in RAS) is on the image's left, the liver (right) likewise
    for plane in ("axial", "coronal"):
        lab = panels[f"{plane}_fixed_label"]
        columns = {i: np.argwhere(lab == i)[:, 1].mean() for i in (1, 2, 3, 4) if (lab == i).any()}
        if 3 in columns and 4 in columns:
            assert columns[3] < lab.shape[1] / 2 < columns[4], plane
        if 1 in columns and 2 in columns:
            assert columns[1] < columns[2], plane
    assert {1, 3, 4} <= set(np.unique(panels["coronal_fixed_label"]))  # the slices go through the organs

    # the known field: u_x = SCALE * i, i.e. towards the patient's right = the image's left (negative columns)
    ddf = np.zeros((3, *SHAPE))
    ddf[0] = SCALE * np.arange(x)[:, None, None]
    np.testing.assert_allclose(panels["axial_ddf_col"], -figures.slice_view(ddf[0], "axial", k), atol=1e-5)
    np.testing.assert_allclose(panels["axial_ddf_row"], 0.0)
    jacobian = registration_metrics.jacobian_determinant(torch.as_tensor(ddf)).numpy()
    np.testing.assert_allclose(panels["coronal_jacobian"], figures.slice_view(jacobian, "coronal", j), atol=1e-5)
    np.testing.assert_allclose(panels["axial_jacobian"], 1 + SCALE, atol=1e-5)
    assert float(panels["folding_percent"]) == 0.0

    # the per-organ Dice of the pair: the evaluation's values (MetricsSaver), before (identity run) and after
    for i, organ in enumerate(ORGANS.values()):
        assert panels["dice"][i] == pytest.approx(_first_case(folders["linear"], f"dice_{organ}"), abs=1e-5)
        assert panels["dice_before"][i] == pytest.approx(_first_case(folders["identity"], f"dice_{organ}"), abs=1e-5)
    identity = figure_panels.load_panels(folders["identity"] / "figure_panels.npz")
    np.testing.assert_allclose(identity["dice"], identity["dice_before"])
    assert not np.allclose(panels["dice"], panels["dice_before"])
    assert (folders["linear"] / "registration_identity_ct2mri.png").stat().st_size > 30_000
    assert not list(folders["linear"].glob(".partial-*"))


def test_every_panel_carries_its_orientation_letters(runs, monkeypatch):
    _, folders = runs
    figure_panels = load_bundle_scripts("f3rnet_ct_mri", "figure_panels")
    drawn = []
    monkeypatch.setattr(figure_panels, "save_figure", lambda fig, path, dpi=0: drawn.append(fig) or path)
    panels = figure_panels.load_panels(folders["linear"] / "figure_panels.npz")
    figure_panels.method_figure(panels, folders["linear"] / "unused.png")
    figure_panels.comparison_figure(folders, folders["linear"] / "unused.png")
    letters = {"axial": {"A", "P", "R", "L"}, "coronal": {"S", "I", "R", "L"}}
    assert len(drawn) == 2
    # method figure: 2 planes x (fixed, moving, warped, grid, det J); comparison: 2 planes x (2 + 3 x 2 methods)
    for fig, panel_count in zip(drawn, (10, 16)):
        shown = [ax for ax in fig.axes if ax.images]
        assert len(shown) == panel_count
        for ax in shown:
            texts = {t.get_text() for t in ax.texts}
            plane = "axial" if "A" in texts else "coronal"
            assert texts == letters[plane], ax.get_title()
        titles = " ".join(ax.get_title() for ax in fig.axes)
        assert "R kidney" in titles and "L kidney" in titles  # per-organ Dice, kidneys apart
        legends = [*fig.legends, *[ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]]
        assert len(legends) == 1
        legend = [t.get_text() for t in legends[0].get_texts()]
        assert legend == ["liver (1)", "spleen (2)", "right kidney (3)", "left kidney (4)"]


def test_comparison_figure_draws_the_runs_and_refuses_other_pairs(runs, tmp_path):
    import matplotlib.image

    _, folders = runs
    evaluate = load_bundle_scripts("f3rnet_ct_mri", "evaluate")
    path = evaluate.comparison_figure(folders, tmp_path / "all" / "comparison.png")
    assert path == tmp_path / "all" / "comparison.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 100_000
    height, width = matplotlib.image.imread(str(path)).shape[:2]
    assert width >= 1000 and height >= 1500  # 4 columns x 6 rows of panels
    assert evaluate.comparison_figure({}, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    with pytest.raises(FileNotFoundError, match="no figure panels"):
        evaluate.comparison_figure({**folders, "other": tmp_path}, tmp_path / "x.png")
    figure_panels = load_bundle_scripts("f3rnet_ct_mri", "figure_panels")
    other = dict(np.load(folders["linear"] / "figure_panels.npz"))
    other["case"] = np.asarray("case999")
    figure_panels.save_panels(tmp_path / "other" / "figure_panels.npz", other)
    with pytest.raises(ValueError, match="do not show the pair and slices"):
        evaluate.comparison_figure({"identity": folders["identity"], "other": tmp_path / "other"}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_panels_refuse_volumes_that_are_not_ras():
    figure_panels = load_bundle_scripts("f3rnet_ct_mri", "figure_panels")
    volume, ddf = np.zeros((16, 16, 16)), np.zeros((3, 16, 16, 16))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="RAS-oriented volumes .*got LPS"):
        figure_panels.capture_panels(volume, volume, volume, volume, volume, volume, ddf, lps, {1: "liver"})
