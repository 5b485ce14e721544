"""Issue 13, kind 5: results that depend on how the array is stored. Every bundle reorients its inputs to RAS, the
orientation it was trained in (MONAI ``Orientationd``), before the network runs, and gives its saved outputs the
input file's orientation back (``common.RestoreOrientationd``; a DDF's components follow its axes). The same world
content stored RAS, LPS or with permuted axes gives the same result."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import Orientation

from tests.helpers import load_bundle_scripts, synthetic_brain
from tests.user_files import as_ras, datalist, hr_pair, lr_pair, read, refusal, run_in_process, save, stored_as
from tools import make_abdomen_phantoms

ROLES = ("moving_image", "fixed_image", "moving_label", "fixed_label")


def _warp(image: np.ndarray, ddf: np.ndarray) -> np.ndarray:
    """MONAI ``Warp`` (bilinear, border) of a stored 3D image with a stored DDF ``[X, Y, Z, 3]`` (voxels)."""
    ddf = torch.as_tensor(np.moveaxis(ddf.reshape(ddf.shape[:3] + (3,)), -1, 0).astype(np.float32))[None]
    return Warp("bilinear", "border")(torch.as_tensor(image.astype(np.float32))[None, None], ddf)[0, 0].numpy()


def _ddf_as_ras(path) -> np.ndarray:
    """A saved DDF ``[X, Y, Z, 3]`` brought to RAS: its array reoriented and its components with it."""
    img = nib.load(str(path))
    ddf = torch.as_tensor(np.moveaxis(np.asarray(img.dataobj, np.float32).reshape(img.shape[:3] + (3,)), -1, 0))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("RAS"))
    out = Orientation("RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(MetaTensor(ddf, affine=img.affine))
    components = [None] * 3
    for axis, (new_axis, flip) in enumerate(ornt):
        components[int(new_axis)] = out[axis].as_tensor() * float(flip)
    return np.moveaxis(torch.stack(components).numpy(), 0, -1)


# ---------------------------------------------------------------------------------------------------- f3rnet
@pytest.fixture(scope="module")
def phantom_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", "32", "32", "32"])
    return root, {
        "name": "case003",
        "moving_image": str(root / "ct" / "case003_ct.nii.gz"),
        "fixed_image": str(root / "mr" / "case003_mr.nii.gz"),
        "moving_label": str(root / "labels" / "case003_ct_label.nii.gz"),
        "fixed_label": str(root / "labels" / "case003_mr_label.nii.gz"),
    }


def _f3rnet_dice(root, item, tag) -> float:
    out = root / f"eval_{tag}"
    run_in_process(
        "f3rnet_ct_mri",
        ["train.json", "evaluate.json"],
        datalist=datalist(root / f"dl_{tag}.json", [item], direction="ct2mri"),
        dataset_dir=str(root),
        output_dir=str(out),
    )
    with open(out / "dice_raw.csv") as f:
        return float(next(csv.DictReader(f))["mean"])


@pytest.mark.parametrize("axcodes", ["LPS", "SPR"])
def test_f3rnet_pair_stored_lps_or_permuted_gives_the_ras_dice(phantom_pair, axcodes):
    """The issue's example (LPS: both arrays flipped, world content unchanged; before: liver Dice 0.902 RAS against
    0.822 LPS on the sample phantoms) and another instance (SPR: axes permuted too), with the shipped weights."""
    root, item = phantom_pair
    stored = {k: stored_as(item[k], root / axcodes / f"{k}.nii.gz", axcodes) for k in ROLES}
    ras = _f3rnet_dice(root, item, "ras")
    assert 0.3 < ras < 1.0
    assert _f3rnet_dice(root, dict(item, **stored), axcodes) == pytest.approx(ras, abs=1e-6)


def test_f3rnet_outputs_of_an_lps_pair_keep_its_geometry_and_the_ddf_reproduces_the_warp(phantom_pair):
    """Saved outputs have the fixed file's affine and array order; in world space they equal the RAS run's; the saved
    DDF's x and y components are negated with the flipped axes, so MONAI Warp of the saved moving image with the saved
    DDF reproduces the saved warped image."""
    root, item = phantom_pair
    lps = {k: stored_as(item[k], root / "LPS_inf" / f"{k}.nii.gz", "LPS") for k in ROLES}
    outputs = {}
    for tag, it in (("ras", item), ("lps", dict(item, **lps))):
        out = root / f"inf_{tag}"
        run_in_process(
            "f3rnet_ct_mri",
            "inference.json",
            datalist=datalist(root / f"inf_{tag}.json", [it], direction="ct2mri"),
            dataset_dir=str(root),
            output_dir=str(out),
        )
        outputs[tag] = {p: out / "case003" / f"case003_{p}.nii.gz" for p in ("ddf", "warped", "warped_label")}
    fixed = nib.load(lps["fixed_image"])
    for path in outputs["lps"].values():
        assert np.allclose(nib.load(str(path)).affine, fixed.affine)
    for p in ("warped", "warped_label"):
        np.testing.assert_array_equal(as_ras(outputs["lps"][p])[0], read(outputs["ras"][p]))
    np.testing.assert_allclose(_ddf_as_ras(outputs["lps"]["ddf"]), _ddf_as_ras(outputs["ras"]["ddf"]), atol=1e-6)
    ddf_lps, ddf_ras = read(outputs["lps"]["ddf"]), read(outputs["ras"]["ddf"])
    np.testing.assert_allclose(ddf_lps[::-1, ::-1].reshape(ddf_ras.shape) * [-1, -1, 1], ddf_ras, atol=1e-6)
    warped = read(outputs["lps"]["warped"])
    rewarped = _warp(read(lps["moving_image"]), ddf_lps)
    assert np.abs(rewarped - warped).max() < 1e-2 * np.abs(warped).max()


# ---------------------------------------------------------------------------------------------------- refdrn
@pytest.fixture(scope="module")
def refdrn_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("refdrn_pair")
    return root, lr_pair(root)


def _refdrn_outputs(root, item, tag) -> dict:
    out = root / f"out_{tag}"
    run_in_process(
        "refdrn",
        "inference.json",
        datalist=datalist(root / f"dl_{tag}.json", [dict(item, name="case")]),
        dataset_dir=str(root),
        output_dir=str(out),
    )
    return {p: out / "case" / f"case_{p}.nii.gz" for p in ("ddf", "sr_fixed", "sr_moving", "warped", "warped_label")}


@pytest.mark.parametrize("stored", ["moving", "fixed"])
def test_refdrn_accepts_a_pair_with_one_image_stored_lps(refdrn_pair, stored):
    """The issue's example (before: refused, with a message printing two identical shapes) and another instance
    (the fixed image LPS instead of the moving one): in world space the outputs equal the all-RAS run's, each output
    in the orientation of its input file (sr_moving: the moving file's; the others: the fixed file's)."""
    root, pair = refdrn_pair
    item = {k: pair[k] for k in ("moving_image", "fixed_image", "moving_label")}
    ras = _refdrn_outputs(root, item, "ras")
    key = f"{stored}_image"
    mixed = _refdrn_outputs(
        root, dict(item, **{key: stored_as(item[key], root / stored / "lps.nii.gz", "LPS")}), stored
    )
    for p, path in mixed.items():
        owner = "moving" if p == "sr_moving" else "fixed"
        assert "".join(nib.aff2axcodes(nib.load(str(path)).affine)) == ("LPS" if owner == stored else "RAS"), p
        if p == "ddf":
            np.testing.assert_allclose(_ddf_as_ras(path), _ddf_as_ras(ras[p]), atol=1e-6)
        else:
            np.testing.assert_array_equal(as_ras(path)[0], read(ras[p]))
            assert np.allclose(as_ras(path)[1], nib.load(str(ras[p])).affine)


def test_refdrn_pair_stored_lps_keeps_its_geometry_and_the_ddf_reproduces_the_warp(refdrn_pair):
    root, pair = refdrn_pair
    item = {k: stored_as(pair[k], root / "both_lps" / f"{k}.nii.gz", "LPS") for k in ("moving_image", "fixed_image")}
    out = _refdrn_outputs(root, item, "both_lps")
    for path in (out[p] for p in ("ddf", "sr_fixed", "sr_moving", "warped")):  # no label given
        assert "".join(nib.aff2axcodes(nib.load(str(path)).affine)) == "LPS"
    rewarped = _warp(read(out["sr_moving"]), read(out["ddf"]))
    np.testing.assert_allclose(rewarped, read(out["warped"]), atol=1e-5)


def test_refdrn_pair_on_different_grids_is_refused_with_both_affines(tmp_path):
    pair = lr_pair(tmp_path)
    img = nib.load(pair["moving_image"])
    shifted = img.affine.copy()
    shifted[:3, 3] += (2.0, 0.0, 0.0)
    moving = stored_as(
        save(np.asarray(img.dataobj), tmp_path / "shifted.nii.gz", shifted), tmp_path / "m.nii.gz", "LPS"
    )
    item = {"moving_image": moving, "fixed_image": pair["fixed_image"]}
    message = refusal(
        "refdrn", "inference.json", tmp_path / "out", datalist=datalist(tmp_path / "dl.json", [item]), dataset_dir="."
    )
    assert message == (
        f"{moving}: the moving image's grid (shape (16, 16, 16), affine [[-4, 0, 0, 32], [0, -4, 0, 30], "
        f"[0, 0, 4, -30]] (LPS)) does not match the fixed image {pair['fixed_image']} (shape (16, 16, 16), affine "
        f"[[4, 0, 0, -30], [0, 4, 0, -30], [0, 0, 4, -30]] (RAS)), also after reorienting both to RAS; resample the "
        f"pair onto one grid (after affine pre-alignment) first"
    )


def test_refdrn_evaluation_of_a_pair_stored_lps_gives_the_ras_dice(tmp_path):
    """The evaluation (the shipped cascade: REM + FDRN) of the same pair stored RAS and LPS (all four files)."""
    pair = hr_pair(tmp_path)
    lps = {k: stored_as(pair[k], tmp_path / "lps" / f"{k}.nii.gz", "LPS") for k in ROLES}
    dice = []
    for tag, item in (("ras", pair), ("lps", lps)):
        run_in_process(
            "refdrn",
            ["train.json", "evaluate.json"],
            datalist=datalist(tmp_path / f"{tag}.json", [dict(item, name="pair")]),
            dataset_dir=".",
            output_dir=str(tmp_path / tag),
        )
        with open(tmp_path / tag / "dice_raw.csv") as f:
            dice.append(float(next(csv.DictReader(f))["mean"]))
    assert 0.3 < dice[0] < 1.0
    assert dice[1] == pytest.approx(dice[0], abs=1e-6)


# ---------------------------------------------------------------------------------------------------- rem_sr
@pytest.mark.parametrize("axcodes", ["LPS", "PIL"])
def test_rem_sr_input_stored_lps_or_permuted_gives_the_ras_sr(tmp_path, axcodes):
    """The issue's example (an LPS-stored LR input) and another instance (PIL: axes permuted): the same SR in world
    space as the RAS input; the saved SR has the input's orientation and the saved LR copy is the input itself."""
    lr, _ = synthetic_brain((12, 14, 10), seed=5)
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = (-22.0, -26.0, -18.0)
    ras_file = save(lr, tmp_path / "ras" / "t1.nii.gz", affine)
    stored = stored_as(ras_file, tmp_path / axcodes / "t1.nii.gz", axcodes)
    sr = {}
    for tag, path in (("ras", ras_file), (axcodes, stored)):
        out = tmp_path / f"out_{tag}"
        run_in_process(
            "rem_sr",
            "inference.json",
            datalist=datalist(tmp_path / f"{tag}.json", [{"image": path, "name": "t1"}]),
            dataset_dir=".",
            output_dir=str(out),
            precision="fp32",  # the orientation handling is under test, not bfloat16 rounding of a permuted volume
        )
        sr[tag] = out / "t1" / "t1_sr.nii.gz"
        np.testing.assert_array_equal(read(out / "t1" / "t1_lr.nii.gz"), read(path))
    assert "".join(nib.aff2axcodes(nib.load(str(sr[axcodes])).affine)) == axcodes
    world, world_affine = as_ras(sr[axcodes])
    np.testing.assert_allclose(world, read(sr["ras"]), atol=1e-5)
    assert np.allclose(world_affine, nib.load(str(sr["ras"])).affine)


# ------------------------------------------------------------------------------------------------ the pieces
def test_restore_orientation_moves_ddf_components_with_the_axes():
    """An input stored SAL (z first, x flipped): the outputs on the RAS grid go back to its array order, and the DDF
    restored with them warps the stored image into the restored warped image."""
    common = load_bundle_scripts("rem_sr", "common")
    affine = torch.tensor([[0, 0, -2.0, 10], [0, 3.0, 0, 5], [1.5, 0, 0, -7], [0, 0, 0, 1]], dtype=torch.float64)
    stored = MetaTensor(torch.rand(1, 6, 7, 8), affine=affine)
    stored.meta["original_affine"] = affine.numpy()
    ras = Orientation("RAS", labels=common.ORIENTATION_LABELS)(stored)
    assert tuple(ras.shape) == (1, 8, 7, 6)
    ddf = MetaTensor(torch.rand(3, 8, 7, 6) * 2 - 1, affine=ras.affine)
    warped = MetaTensor(Warp("bilinear", "border")(ras.as_tensor()[None], ddf.as_tensor()[None])[0], affine=ras.affine)
    out = common.RestoreOrientationd(["ddf", "warped", "image"], ref_key="input", ddf_keys="ddf")(
        {"ddf": ddf, "warped": warped, "image": ras, "input": stored}
    )
    assert torch.equal(out["image"].as_tensor(), stored.as_tensor())
    assert torch.allclose(out["image"].affine, affine)
    rewarped = Warp("bilinear", "border")(stored.as_tensor()[None], out["ddf"].as_tensor()[None])[0]
    torch.testing.assert_close(rewarped, out["warped"].as_tensor(), atol=1e-5, rtol=0)
