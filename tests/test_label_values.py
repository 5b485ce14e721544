"""Issue 13, kind 3: label values that do not fit. The warped label is saved in a dtype that holds every id (uint8,
int16 or int32 from the label's largest id: ``scripts.pairs.label_dtype``); non-integer or negative values, and ids
beyond refdrn's evaluation ``num_classes``, are refused up front with one message."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.helpers import load_bundle_scripts
from tests.user_files import HR_AFFINE, datalist, hr_pair, lr_pair, read, refusal, run_in_process, save
from tools import make_abdomen_phantoms


@pytest.fixture(scope="module")
def pairs():
    return load_bundle_scripts("refdrn", "pairs")


def _relabelled(path: str, dst, ids: dict[int, int]) -> str:
    """A copy of a label file (same grid) with its ids mapped by `ids` (others kept), stored as int32."""
    data = read(path).astype(np.int32)
    out = data.copy()
    for old, new in ids.items():
        out[data == old] = new
    return save(out, dst, nib.load(path).affine)


@pytest.mark.parametrize(
    "ids, dtype",
    [
        ((300, 1002), torch.int16),
        (tuple(range(1001, 1083)), torch.int16),
        ((7, 255), torch.uint8),
        ((70000,), torch.int32),
    ],
)
def test_warp_moving_keeps_every_id(pairs, ids, dtype):
    """The issue's ids 1002 (was saved as 234) and 300 (was 44), FreeSurfer's 1001-1082 (wrapped to 0-255), and the
    uint8 / int32 ends; a zero DDF must give the label back unchanged."""
    values = torch.tensor((0, *ids), dtype=torch.int32)
    label = values[torch.arange(4 * 6 * 5) % len(values)].reshape(1, 4, 6, 5)
    out = pairs.WarpMovingd(image_key="image")(
        {"pred": MetaTensor(torch.zeros(3, 4, 6, 5), affine=torch.eye(4)), "moving_label": MetaTensor(label)}
    )["warped_moving_label"]
    assert out.dtype == dtype
    assert torch.equal(out.as_tensor().to(torch.int32), label)


def test_label_dtype_boundaries(pairs):
    assert [pairs.label_dtype(v) for v in (0, 255, 256, 32767, 32768, 2**31 - 1)] == [
        torch.uint8,
        torch.uint8,
        torch.int16,
        torch.int16,
        torch.int32,
        torch.int32,
    ]


def test_f3rnet_inference_saves_ids_300_and_1002_unchanged(tmp_path):
    """The issue's example through f3rnet's inference.json (shipped weights, a phantom pair): the organs relabelled
    1 -> 300 and 2 -> 1002."""
    root = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", "32", "32", "32"])
    label = _relabelled(str(root / "labels" / "case003_ct_label.nii.gz"), tmp_path / "ids.nii.gz", {1: 300, 2: 1002})
    out = tmp_path / "out"
    run_in_process(
        "f3rnet_ct_mri",
        "inference.json",
        moving_image=str(root / "ct" / "case003_ct.nii.gz"),
        fixed_image=str(root / "mr" / "case003_mr.nii.gz"),
        moving_label=label,
        output_dir=str(out),
    )
    warped = read(out / "case003_ct" / "case003_ct_warped_label.nii.gz")
    assert warped.dtype == np.int16
    assert set(np.unique(warped)) == {0, 300, 1002, 3, 4}


def test_refdrn_inference_saves_freesurfer_ids_unchanged(tmp_path):
    """Another instance: refdrn with FreeSurfer cortical ids (1001 .. 1004 for the four labels)."""
    pair = lr_pair(tmp_path)
    label = _relabelled(pair["moving_label"], tmp_path / "fs.nii.gz", {i: 1000 + i for i in range(1, 5)})
    item = {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"], "moving_label": label}
    out = tmp_path / "out"
    run_in_process(
        "refdrn",
        "inference.json",
        datalist=datalist(tmp_path / "dl.json", [item]),
        dataset_dir=".",
        output_dir=str(out),
    )
    warped = read(out / "moving_lr" / "moving_lr_warped_label.nii.gz")
    assert warped.dtype == np.int16
    assert set(np.unique(warped)) == {0, 1001, 1002, 1003, 1004}


@pytest.mark.parametrize(
    "value, expected",
    [
        (1.5, "a label map must hold integer ids >= 0, found 1.5 (1 voxels)"),
        (-1, "a label map must hold integer ids >= 0, found -1.0 (1 voxels)"),
    ],
)
def test_non_integer_or_negative_label_values_are_refused(pairs, tmp_path, value, expected):
    pair = hr_pair(tmp_path)
    data = read(pair["moving_label"]).astype(np.float32)
    data[3, 4, 5] = value
    label = save(data, tmp_path / "bad.nii.gz", HR_AFFINE)
    item = {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"], "moving_label": label}
    with pytest.raises(pairs.BundleInputError) as err:
        pairs.check_pairs([item])
    assert str(err.value) == f"{label} ('moving_label'): {expected}"


def test_negative_fixed_label_is_refused_by_the_f3rnet_evaluation(tmp_path):
    """Another instance, end to end: an int16 fixed label with a -5 in evaluate.json (before: one-hot of a negative
    id)."""
    pair = hr_pair(tmp_path)
    data = read(pair["fixed_label"]).astype(np.int16)
    data[0, 0, :2] = -5
    label = save(data, tmp_path / "neg.nii.gz", HR_AFFINE)
    item = {**{k: pair[k] for k in ("moving_image", "fixed_image", "moving_label")}, "fixed_label": label}
    message = refusal(
        "f3rnet_ct_mri",
        ["train.json", "evaluate.json"],
        tmp_path / "out",
        method="identity",
        datalist=datalist(tmp_path / "dl.json", [item], direction="ct2mri"),
        dataset_dir=".",
    )
    assert message == f"{label} ('fixed_label'): a label map must hold integer ids >= 0, found -5 (2 voxels)"


def test_refdrn_evaluation_refuses_ids_beyond_num_classes_and_accepts_a_wider_num_classes(tmp_path):
    """refdrn's Dice/HD95/ASD count ids 0 .. num_classes - 1 (83 by default): id 300 is refused up front, naming the
    --num_classes to pass; with --num_classes 301 the evaluation runs and id 300 counts."""
    pair = hr_pair(tmp_path)
    moving = _relabelled(pair["moving_label"], tmp_path / "m300.nii.gz", {4: 300})
    fixed = _relabelled(pair["fixed_label"], tmp_path / "f300.nii.gz", {4: 300})
    item = {"moving_image": pair["moving_image"], "fixed_image": pair["fixed_image"]}
    item.update(moving_label=moving, fixed_label=fixed)
    dl = datalist(tmp_path / "dl.json", [item])
    message = refusal(
        "refdrn", ["train.json", "evaluate.json"], tmp_path / "out", method="identity", datalist=dl, dataset_dir="."
    )
    assert message == (
        f"{fixed} ('fixed_label'): label id 300 >= num_classes 83; pass --num_classes 301 (the metrics count the ids "
        f"0 .. num_classes - 1)"
    )
    run_in_process(
        "refdrn",
        ["train.json", "evaluate.json"],
        method="identity",
        num_classes=301,
        datalist=dl,
        dataset_dir=".",
        output_dir=str(tmp_path / "out"),
    )
    with open(tmp_path / "out" / "dice_raw.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["class299"]) > 0.3  # label 300 (class 299: background excluded) was evaluated


def test_f3rnet_evaluation_ignores_an_id_beyond_its_organs_instead_of_wrapping_it(tmp_path):
    """Another instance: a moving label holding id 257 (no organ of label_names) next to the organs. Before, the
    uint8 warped label wrapped 257 to 1, the liver; now it stays 257 and is left out like any other id, so the Dice
    equals the one without it."""
    pair = hr_pair(tmp_path)
    data = read(pair["moving_label"]).astype(np.int16)
    assert not data[:4, :4, :4].any()
    data[:4, :4, :4] = 257  # a corner outside the organs
    extra = save(data, tmp_path / "extra.nii.gz", HR_AFFINE)
    dice = []
    for tag, label in (("organs", pair["moving_label"]), ("extra_id", extra)):
        item = {**{k: pair[k] for k in ("moving_image", "fixed_image", "fixed_label")}, "moving_label": label}
        run_in_process(
            "f3rnet_ct_mri",
            ["train.json", "evaluate.json"],
            method="identity",
            datalist=datalist(tmp_path / f"{tag}.json", [item], direction="ct2mri"),
            dataset_dir=".",
            output_dir=str(tmp_path / tag),
        )
        with open(tmp_path / tag / "dice_liver_raw.csv") as f:
            dice.append(float(next(csv.DictReader(f))["mean"]))
    assert 0.3 < dice[0] < 1.0
    assert dice[1] == pytest.approx(dice[0], abs=1e-6)
