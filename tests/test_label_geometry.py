"""Issue 13, kind 2: labels whose geometry is ignored. Labels (moving and fixed, inference and evaluation, refdrn and
f3rnet_ct_mri) are brought onto their image's grid by world coordinates with nearest neighbour whenever the affine
or the shape differs (``scripts.pairs.LabelsToImageGridd`` / ``WarpMovingd``); a label that does not overlap its
image is refused before anything is written."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.helpers import load_bundle_scripts
from tests.user_files import datalist, hr_pair, lr_pair, read, refusal, run_in_process, save, stored_as


def _dice(output_dir) -> float:
    with open(output_dir / "dice_raw.csv") as f:
        return float(next(csv.DictReader(f))["mean"])


def _refdrn_warped_label(tmp_path, pair: dict, moving_label: str, tag: str) -> np.ndarray:
    item = {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"], "moving_label": moving_label}
    out = tmp_path / f"out_{tag}"
    run_in_process(
        "refdrn",
        "inference.json",
        datalist=datalist(tmp_path / f"dl_{tag}.json", [item]),
        dataset_dir=str(tmp_path),
        output_dir=str(out),
    )
    return read(out / "moving_lr" / "moving_lr_warped_label.nii.gz")


@pytest.fixture(scope="module")
def refdrn_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("refdrn_pair")
    pair = lr_pair(root)
    return root, pair, _refdrn_warped_label(root, pair, pair["moving_label"], "as_given")


@pytest.mark.parametrize("axcodes", ["LAS", "ASL"])
def test_refdrn_label_stored_mirrored_or_permuted_gives_the_same_warped_label(refdrn_pair, axcodes):
    """The issue's example (LAS: mirrored in x, affine adjusted; before, 34% of the warped voxels differed) and
    another instance (ASL: axes permuted and flipped)."""
    root, pair, expected = refdrn_pair
    stored = stored_as(pair["moving_label"], root / axcodes / "moving_labels.nii.gz", axcodes)
    assert not np.array_equal(read(stored), read(pair["moving_label"]))
    warped = _refdrn_warped_label(root, pair, stored, axcodes)
    assert set(np.unique(expected)) == {0, 1, 2, 3, 4}
    np.testing.assert_array_equal(warped, expected)


def test_f3rnet_evaluate_fixed_label_stored_mirrored_gives_the_same_dice(tmp_path):
    pair = hr_pair(tmp_path)
    item = {k: pair[k] for k in ("moving_image", "fixed_image", "moving_label", "fixed_label")}
    mirrored = dict(item, fixed_label=stored_as(pair["fixed_label"], tmp_path / "lps" / "fixed.nii.gz", "LPS"))
    dice = []
    for tag, it in (("as_given", item), ("mirrored", mirrored)):
        out = tmp_path / tag
        run_in_process(
            "f3rnet_ct_mri",
            ["train.json", "evaluate.json"],
            method="identity",
            datalist=datalist(tmp_path / f"{tag}.json", [it], direction="ct2mri"),
            dataset_dir=str(tmp_path),
            output_dir=str(out),
        )
        dice.append(_dice(out))
    assert 0.3 < dice[0] < 0.99
    assert dice[1] == pytest.approx(dice[0], abs=1e-6)


def test_refdrn_evaluate_moving_label_on_a_finer_grid_is_resampled_to_its_image(tmp_path):
    """Another instance: the moving label on a grid 2x finer than its image (0.5 mm, same field of view, each
    image voxel split in 2x2x2); resampled by world coordinates, nearest neighbour, it gives the same Dice as the
    label on the image's grid (before, a label of another shape was not resampled in evaluation at all)."""
    pair = hr_pair(tmp_path)
    fine = np.repeat(np.repeat(np.repeat(read(pair["moving_label"]), 2, 0), 2, 1), 2, 2)
    affine = np.diag([0.5, 0.5, 0.5, 1.0])
    affine[:3, 3] = -31.75  # the image's first voxel, centred at -31.5 mm, spans [-32, -31] mm
    fine_label = save(fine, tmp_path / "fine" / "moving_labels.nii.gz", affine)
    runs = {}
    for tag, label in (("as_given", pair["moving_label"]), ("fine", fine_label)):
        item = {**{k: pair[k] for k in ("moving_image", "fixed_image", "fixed_label")}, "moving_label": label}
        out = tmp_path / tag
        run_in_process(
            "refdrn",
            ["train.json", "evaluate.json"],
            method="identity",
            datalist=datalist(tmp_path / f"{tag}.json", [item]),
            dataset_dir=str(tmp_path),
            output_dir=str(out),
        )
        runs[tag] = _dice(out)
    assert runs["fine"] == pytest.approx(runs["as_given"], abs=1e-6)


def test_labels_to_image_grid_resamples_by_world_coordinates():
    pairs = load_bundle_scripts("refdrn", "pairs")
    coarse = torch.arange(27, dtype=torch.int16).reshape(1, 3, 3, 3) * 40  # ids up to 1040
    fine_affine = torch.eye(4, dtype=torch.float64)
    coarse_affine = torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0], dtype=torch.float64))
    coarse_affine[:3, 3] = 1.0  # coarse voxel i is centred on fine voxel 3i + 1
    data = {
        "label": MetaTensor(coarse, affine=coarse_affine),
        "image": MetaTensor(torch.zeros(1, 9, 9, 9), affine=fine_affine),
    }
    out = pairs.LabelsToImageGridd("label", "image")(data)["label"]
    expected = coarse[0].repeat_interleave(3, 0).repeat_interleave(3, 1).repeat_interleave(3, 2)
    assert out.dtype == torch.int16 and tuple(out.shape) == (1, 9, 9, 9)
    assert torch.equal(out[0].as_tensor(), expected)
    assert torch.allclose(out.affine, fine_affine)
    # already on the grid: returned as is
    same = MetaTensor(torch.ones(1, 9, 9, 9, dtype=torch.uint8), affine=fine_affine)
    assert pairs.LabelsToImageGridd("label", "image")({"label": same, "image": data["image"]})["label"] is same


def test_refdrn_label_outside_its_image_is_refused(tmp_path):
    """The issue's rule: a moving label that does not overlap its image (shifted by 100 mm) is refused."""
    pair = lr_pair(tmp_path)
    affine = np.eye(4)
    affine[:3, 3] = (68.5, -31.5, -31.5)
    label = save(read(pair["moving_label"]), tmp_path / "far" / "moving_labels.nii.gz", affine)
    item = {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"], "moving_label": label}
    message = refusal(
        "refdrn", "inference.json", tmp_path / "out", datalist=datalist(tmp_path / "dl.json", [item]), dataset_dir="."
    )
    assert message == (
        f"{label} ('moving_label'): the label (shape (64, 64, 64), affine [[1, 0, 0, 68.5], [0, 1, 0, -31.5], "
        f"[0, 0, 1, -31.5]] (RAS)) does not overlap its image {pair['moving_image']} (shape (16, 16, 16), affine "
        f"[[4, 0, 0, -30], [0, 4, 0, -30], [0, 0, 4, -30]] (RAS)); check that the label belongs to this image"
    )


def test_f3rnet_evaluate_fixed_label_outside_its_image_is_refused(tmp_path):
    """Another instance: the fixed label of an evaluation, stored LPS and beyond the image in z."""
    pair = hr_pair(tmp_path)
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = (31.5, 31.5, 40.0)
    label = save(read(pair["fixed_label"])[::-1, ::-1].copy(), tmp_path / "far" / "fixed_labels.nii.gz", affine)
    item = {**{k: pair[k] for k in ("moving_image", "fixed_image", "moving_label")}, "fixed_label": label}
    message = refusal(
        "f3rnet_ct_mri",
        ["train.json", "evaluate.json"],
        tmp_path / "out",
        method="identity",
        datalist=datalist(tmp_path / "dl.json", [item], direction="ct2mri"),
        dataset_dir=".",
    )
    assert message == (
        f"{label} ('fixed_label'): the label (shape (32, 32, 32), affine [[-1, 0, 0, 31.5], [0, -1, 0, 31.5], "
        f"[0, 0, 1, 40]] (LPS)) does not overlap its image {pair['fixed_image']} (shape (32, 32, 32), affine "
        f"[[1, 0, 0, -31.5], [0, 1, 0, -31.5], [0, 0, 1, -31.5]] (RAS)); check that the label belongs to this image"
    )
