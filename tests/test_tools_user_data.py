"""Issue 13 for the tools that take user data (tools/prepare_lpba40.py, tools/prepare_learn2reg_abdomen.py,
tools/fit_pair.py): every input is read with nibabel and checked before anything is written; labels are brought onto
their image's grid by world coordinates; label values, intensities, storage orientation and trailing singleton axes
give the right result or one clear ``error: ...`` line."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from tests.test_abdomen_tools import IN_AFFINE, make_l2r_tree
from tests.test_fit_pair import shifted_pair
from tests.test_prepare_lpba40 import make_fake_lpba40
from tools import fit_pair
from tools import prepare_learn2reg_abdomen as l2r
from tools import prepare_lpba40 as prep
from tools.niftiio import read_volume

SUBJECTS = ["S01", "S02", "S03"]


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def error_of(call) -> str:
    with pytest.raises(SystemExit) as err:
        call()
    assert isinstance(err.value.code, str), err.value.code  # a message (exit code 1), not a bare exit
    assert "\n" not in err.value.code
    return err.value.code


# ---------------------------------------------------------------------------------------------- shared reader
def test_read_volume_squeezes_trailing_singletons_and_refuses_extra_axes(tmp_path):
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1, 1), np.float32), np.eye(4)), str(tmp_path / "a.nii.gz"))
    assert read_volume(tmp_path / "a.nii.gz")[0].shape == (4, 5, 6)
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 2), np.float32), np.eye(4)), str(tmp_path / "b.nii.gz"))
    assert error_of(lambda: read_volume(tmp_path / "b.nii.gz", "image")) == (
        f"error: image {tmp_path / 'b.nii.gz'} has shape (4, 5, 6, 2); expected a 3D volume (x, y, z), "
        "optionally with trailing singleton axes"
    )


# ---------------------------------------------------------------------------------------------- LPBA40
def lpba(tmp_path, name="LPBA40"):
    make_fake_lpba40(tmp_path / name, SUBJECTS)
    return tmp_path / name


def run_lpba(root, out):
    return prep.main(["--root", str(root), "--out", str(out), "--subjects", *SUBJECTS])


def subject_file(root, subject, kind):
    suffix = prep.IMAGE_SUFFIX if kind == "image" else prep.LABEL_SUFFIX
    return root / "delineation_space" / subject / f"{subject}{suffix}"


def rewrite(path, change, image_class=nib.Spm2AnalyzeImage, affine=None):
    img = nib.load(str(path))
    data, new_affine = change(np.array(img.dataobj), img.affine if affine is None else affine)  # a copy, not a memmap
    nib.save(image_class(data, new_affine), str(path))


@pytest.fixture(scope="module")
def lpba_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpba_base")
    root = lpba(tmp)
    assert run_lpba(root, tmp / "out") == 0
    return tmp / "out"


def outputs(out, subject="S02"):
    image = load(out / "images" / f"{subject}_T1w.nii.gz")
    label = load(out / "labels" / f"{subject}_label.nii.gz")
    return image, label


def test_lpba40_5d_singletons_give_the_4d_result(tmp_path, lpba_baseline):  # kind 7
    root = lpba(tmp_path)
    for kind in ("image", "label"):
        rewrite(subject_file(root, "S02", kind), lambda d, a: (d[..., None], a), nib.AnalyzeImage)
    assert nib.load(str(subject_file(root, "S02", "image"))).shape[3:] == (1, 1)
    assert run_lpba(root, tmp_path / "out") == 0
    (img, _), (lab, _) = outputs(tmp_path / "out")
    (img0, _), (lab0, _) = outputs(lpba_baseline)
    np.testing.assert_array_equal(img, img0)
    np.testing.assert_array_equal(lab, lab0)


def test_lpba40_non_singleton_extra_axis_is_refused_before_any_write(tmp_path):  # kinds 7, 12
    root = lpba(tmp_path)
    path = subject_file(root, "S03", "image")  # the last subject: found before S01's outputs are written
    rewrite(path, lambda d, a: (np.concatenate([d, d], axis=3), a), nib.AnalyzeImage)
    assert error_of(lambda: run_lpba(root, tmp_path / "out")) == (
        f"error: image {path} has shape (60, 70, 50, 2); expected a 3D volume (x, y, z), "
        "optionally with trailing singleton axes"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [300, 1002])
def test_lpba40_label_ids_that_do_not_fit_are_refused_before_any_write(tmp_path, bad):  # kinds 3, 12
    root = lpba(tmp_path)
    path = subject_file(root, "S03", "label")
    rewrite(path, lambda d, a: (np.where(d == d.max(), bad, d).astype(np.int16), a), nib.AnalyzeImage)
    message = error_of(lambda: run_lpba(root, tmp_path / "out"))
    assert message.startswith(f"error: {path} has unexpected label id(s) [{bad}]; LPBA40 labels are 0 and 21..182")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,problem", [(-1.0, "negative values (lowest -1)"), (21.5, "non-integer values")])
def test_lpba40_negative_or_fractional_labels_are_refused(tmp_path, value, problem):  # kind 3
    root = lpba(tmp_path)
    path = subject_file(root, "S02", "label")
    rewrite(path, lambda d, a: (np.where(d > 0, value, d).astype(np.float32), a), nib.AnalyzeImage)
    assert problem in error_of(lambda: run_lpba(root, tmp_path / "out"))


def test_lpba40_label_on_a_padded_grid_is_resampled_by_world_coordinates(tmp_path, lpba_baseline):  # kind 2
    root = lpba(tmp_path)
    img_path, lab_path = subject_file(root, "S02", "image"), subject_file(root, "S02", "label")
    affine = nib.load(str(img_path)).affine
    rewrite(img_path, lambda d, a: (d, a), affine=affine)  # SPM2 Analyze: the header keeps this affine
    padded = affine.copy()
    padded[:3, 3] -= affine[:3, :3] @ [5, 3, 0]  # 5 and 3 more voxels before x and y: same world content

    def pad(d, a):
        return np.pad(d, ((5, 2), (3, 0), (0, 4)) + ((0, 0),) * (d.ndim - 3)), a

    rewrite(lab_path, pad, affine=padded)
    assert run_lpba(root, tmp_path / "out") == 0
    np.testing.assert_array_equal(outputs(tmp_path / "out")[1][0], outputs(lpba_baseline)[1][0])


def test_lpba40_label_that_misses_its_image_is_refused(tmp_path):  # kind 2
    root = lpba(tmp_path)
    lab_path = subject_file(root, "S02", "label")
    far = np.diag([-1.0, 1.5, 1.0, 1.0])
    far[:3, 3] = [500, 500, 500]
    rewrite(lab_path, lambda d, a: (d, a), affine=far)
    message = error_of(lambda: run_lpba(root, tmp_path / "out"))
    assert message.startswith(f"error: label {lab_path} (shape (60, 70, 50), affine [[-1.0, 0.0, 0.0, 500.0]")
    assert f"does not overlap its image {subject_file(root, 'S02', 'image')}" in message


@pytest.mark.parametrize("change", ["x110", "zscore"])
def test_lpba40_intensities_are_invariant_to_scale_and_offset(tmp_path, lpba_baseline, change):  # kind 4
    root = lpba(tmp_path)

    def transform(d, a):
        d = d.astype(np.float32)
        return (d * 110 if change == "x110" else (d - d.mean()) / d.std()), a

    rewrite(subject_file(root, "S02", "image"), transform, nib.AnalyzeImage)
    assert run_lpba(root, tmp_path / "out") == 0
    (img, _), _ = outputs(tmp_path / "out")
    (img0, _), _ = outputs(lpba_baseline)
    np.testing.assert_allclose(img, img0, atol=1e-5)


def test_lpba40_unusable_out_folder_is_refused_before_any_work(tmp_path):  # kind 12
    root = lpba(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert error_of(lambda: run_lpba(root, blocker)) == f"error: output path {blocker} exists and is not a folder"
    message = error_of(lambda: run_lpba(root, blocker / "out"))
    assert message.startswith(f"error: cannot write to the output folder {blocker / 'out'}: ")


# ---------------------------------------------------------------------------------------------- Learn2Reg abdomen
L2R_CASE = "AbdomenMRCT_0001_0000.nii.gz"


@pytest.fixture(scope="module")
def l2r_baseline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("l2r_base")
    root = make_l2r_tree(tmp / "AbdomenMRCT")
    assert l2r.main(["--root", str(root), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def save_like(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))


def l2r_run(root, out):
    return l2r.main(["--root", str(root), "--out", str(out)])


def test_l2r_label_mirrored_or_padded_gives_the_same_labels(tmp_path, l2r_baseline):  # kinds 2, 5
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    label, affine = load(root / "labelsTr" / L2R_CASE)
    mirrored = affine @ np.array([[-1, 0, 0, label.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    save_like(root / "labelsTr" / L2R_CASE, label[::-1].copy(), mirrored)  # LPS-like storage, same world content
    mask, _ = load(root / "masksTr" / L2R_CASE)
    padded = affine.copy()
    padded[:3, 3] -= affine[:3, :3] @ [4, 0, 2]
    save_like(root / "masksTr" / L2R_CASE, np.pad(mask, ((4, 1), (0, 3), (2, 0))), padded)
    assert l2r_run(root, tmp_path / "out") == 0
    for rel in ("labels/AbdomenMRCT_0001_mr_label.nii.gz", "masks/AbdomenMRCT_0001_mr_mask.nii.gz"):
        np.testing.assert_array_equal(load(tmp_path / "out" / rel)[0], load(l2r_baseline / rel)[0])


def test_l2r_image_stored_flipped_gives_the_same_outputs(tmp_path, l2r_baseline):  # kind 5
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    flip = np.array([[1, 0, 0, 0], [0, -1, 0, IN_AFFINE.shape[0]], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    for sub in ("imagesTr", "labelsTr", "masksTr"):
        for name in (L2R_CASE, L2R_CASE.replace("_0000", "_0001")):
            data, affine = load(root / sub / name)
            flip[1, 3] = data.shape[1] - 1
            save_like(root / sub / name, data[:, ::-1].copy(), affine @ flip)
    assert l2r_run(root, tmp_path / "out") == 0
    for rel in (
        "mr/AbdomenMRCT_0001_mr.nii.gz",
        "ct/AbdomenMRCT_0001_ct.nii.gz",
        "labels/AbdomenMRCT_0001_ct_label.nii.gz",
    ):
        new, new_affine = load(tmp_path / "out" / rel)
        old, old_affine = load(l2r_baseline / rel)
        np.testing.assert_array_equal(new, old)
        np.testing.assert_allclose(new_affine, old_affine)


def test_l2r_label_that_misses_its_image_is_refused_before_any_write(tmp_path):  # kinds 2, 12
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    name = "AbdomenMRCT_0003_0001.nii.gz"
    label, affine = load(root / "labelsTr" / name)
    far = affine.copy()
    far[:3, 3] += 1000
    save_like(root / "labelsTr" / name, label, far)
    message = error_of(lambda: l2r_run(root, tmp_path / "out"))
    assert message.startswith(f"error: label {root / 'labelsTr' / name} (shape (160, 40, 36), affine ")
    assert "does not overlap its image" in message
    assert not (tmp_path / "out").exists()


def test_l2r_label_ids_above_255_map_by_name(tmp_path, l2r_baseline):  # kind 3
    labels = {"0": "background", "1001": "Spleen", "1002": "liver", "1003": "left kidney", "1004": "Kidney_Right"}
    root = make_l2r_tree(tmp_path / "AbdomenMRCT", labels=labels)
    for path in (root / "labelsTr").iterdir():
        data, affine = load(path)
        save_like(path, np.where((data > 0) & (data < 5), data.astype(np.int16) + 1000, 0).astype(np.int16), affine)
    assert l2r_run(root, tmp_path / "out") == 0
    rel = "labels/AbdomenMRCT_0002_ct_label.nii.gz"
    np.testing.assert_array_equal(load(tmp_path / "out" / rel)[0], load(l2r_baseline / rel)[0])


@pytest.mark.parametrize("value,problem", [(2.5, "holds non-integer values (e.g. 2.5)"), (-3, "negative values")])
def test_l2r_fractional_or_negative_labels_are_refused_before_any_write(tmp_path, value, problem):  # kinds 3, 12
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    path = root / "labelsTr" / "AbdomenMRCT_0003_0001.nii.gz"
    data, affine = load(path)
    save_like(path, np.where(data == 2, value, data.astype(np.float32)).astype(np.float32), affine)
    message = error_of(lambda: l2r_run(root, tmp_path / "out"))
    assert message.startswith(f"error: label {path} ") and problem in message
    assert not (tmp_path / "out").exists()


def test_l2r_ct_not_in_hounsfield_units_is_refused(tmp_path):  # kind 4
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    path = root / "imagesTr" / "AbdomenMRCT_0002_0001.nii.gz"
    data, affine = load(path)
    save_like(path, (data + 1024).astype(np.float32), affine)  # a 0-4095 scanner range
    message = error_of(lambda: l2r_run(root, tmp_path / "out"))
    assert message.startswith(f"error: CT image {path} has values in [")
    assert "expected Hounsfield units" in message
    save_like(path, ((data + 1000) / 2500).astype(np.float32), affine)  # scaled to [0, 1]
    assert "expected Hounsfield units" in error_of(lambda: l2r_run(root, tmp_path / "out"))


def test_l2r_zscored_mr_is_the_same_volume_in_other_units(tmp_path, l2r_baseline):  # kind 4
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    path = root / "imagesTr" / L2R_CASE
    data, affine = load(path)
    mean, std = float(data.mean()), float(data.std())
    save_like(path, ((data - mean) / std).astype(np.float32), affine)
    assert l2r_run(root, tmp_path / "out") == 0
    rel = "mr/AbdomenMRCT_0001_mr.nii.gz"
    np.testing.assert_allclose(load(tmp_path / "out" / rel)[0], (load(l2r_baseline / rel)[0] - mean) / std, atol=1e-4)


def test_l2r_5d_singletons_and_extra_axis(tmp_path, l2r_baseline):  # kind 7
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    path = root / "imagesTr" / L2R_CASE
    data, affine = load(path)
    save_like(path, data[..., None, None], affine)
    assert l2r_run(root, tmp_path / "out") == 0
    rel = "mr/AbdomenMRCT_0001_mr.nii.gz"
    np.testing.assert_array_equal(load(tmp_path / "out" / rel)[0], load(l2r_baseline / rel)[0])
    save_like(path, np.stack([data, data], axis=-1), affine)
    assert error_of(lambda: l2r_run(root, tmp_path / "out2")) == (
        f"error: MR image {path} has shape (160, 40, 36, 2); expected a 3D volume (x, y, z), "
        "optionally with trailing singleton axes"
    )
    assert not (tmp_path / "out2").exists()


def test_l2r_pair_listed_twice_is_refused(tmp_path):  # kind 1
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    dataset = json.loads((root / "AbdomenMRCT_dataset.json").read_text())
    dataset["training_paired_images"].append(dataset["training_paired_images"][0])
    (root / "AbdomenMRCT_dataset.json").write_text(json.dumps(dataset))
    message = error_of(lambda: l2r_run(root, tmp_path / "out"))
    assert "`training_paired_images` lists the pair AbdomenMRCT_0001" in message


def test_l2r_unwritable_out_folder_is_refused_before_any_work(tmp_path):  # kind 12
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    message = error_of(lambda: l2r_run(root, blocker / "out"))
    assert message.startswith(f"error: cannot write to the output folder {blocker / 'out'}: ")


# ---------------------------------------------------------------------------------------------- fit_pair
def fit(datalist, *extra, bundle="refdrn"):
    args = ["--bundle", bundle, "--datalist", str(datalist), "--downsample", "1", "--grid", "2", "--iterations", "0"]
    return fit_pair.main(args + list(extra))


def identity_dice(capsys) -> float:
    return float(re.search(r"identity Dice ([0-9.]+)", capsys.readouterr().out).group(1))


@pytest.fixture
def pair(tmp_path, capsys):
    datalist = shifted_pair(tmp_path)
    assert fit(datalist) == 0
    return tmp_path, datalist, identity_dice(capsys)


def test_fit_pair_mirrored_label_and_lps_image_give_the_same_dice(pair, capsys):  # kinds 2, 5
    root, datalist, dice = pair
    for name in ("fixed_label.nii.gz", "moving.nii.gz", "moving_label.nii.gz"):
        data, affine = load(root / name)
        flip = np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
        save_like(root / name, data[::-1].copy(), affine @ flip)
    assert fit(datalist) == 0
    assert identity_dice(capsys) == dice


def test_fit_pair_large_label_ids_give_the_same_dice(pair, capsys):  # kind 3
    root, datalist, dice = pair
    for name, offset in (("fixed_label.nii.gz", 1000), ("moving_label.nii.gz", 1000)):
        data, affine = load(root / name)
        save_like(root / name, np.where(data > 0, data.astype(np.int32) + offset, 0).astype(np.int32), affine)
    assert fit(datalist) == 0
    assert identity_dice(capsys) == dice
    data, affine = load(root / "fixed_label.nii.gz")
    save_like(root / "fixed_label.nii.gz", np.where(data > 0, 10**7, 0).astype(np.int32), affine)  # no 10^14 table
    assert fit(datalist) == 0


def test_fit_pair_negative_label_is_refused(pair):  # kind 3
    root, datalist, _ = pair
    data, affine = load(root / "moving_label.nii.gz")
    save_like(root / "moving_label.nii.gz", -data.astype(np.int16), affine)
    message = error_of(lambda: fit(datalist))
    assert message == (
        f"error: moving_label {root / 'moving_label.nii.gz'} holds negative values (lowest -2); label ids must be >= 0"
    )


def test_fit_pair_scale_and_offset_do_not_change_the_refdrn_loss(pair, capsys):  # kind 4
    root, datalist, _ = pair
    assert fit(datalist) == 0
    loss = float(re.search(r"loss ([-0-9.]+)", capsys.readouterr().out).group(1))
    for name in ("moving.nii.gz", "fixed.nii.gz"):
        data, affine = load(root / name)
        save_like(root / name, (data * 110 + 7).astype(np.float32), affine)
    assert fit(datalist) == 0
    assert float(re.search(r"loss ([-0-9.]+)", capsys.readouterr().out).group(1)) == pytest.approx(loss, abs=2e-4)


def test_fit_pair_trailing_singletons_and_extra_axis(pair, capsys):  # kind 7
    root, datalist, dice = pair
    data, affine = load(root / "moving.nii.gz")
    save_like(root / "moving.nii.gz", data[..., None, None], affine)
    assert fit(datalist) == 0
    assert identity_dice(capsys) == dice
    save_like(root / "moving.nii.gz", np.stack([data, data], -1), affine)
    assert error_of(lambda: fit(datalist)) == (
        f"error: moving_image {root / 'moving.nii.gz'} has shape (40, 48, 40, 2); expected a 3D volume (x, y, z), "
        "optionally with trailing singleton axes"
    )


def test_fit_pair_missing_file_and_mismatched_grids(pair):  # messages, kind 2
    root, datalist, _ = pair
    data, affine = load(root / "fixed.nii.gz")
    shifted = affine.copy()
    shifted[0, 3] += 30
    save_like(root / "fixed.nii.gz", data, shifted)
    message = error_of(lambda: fit(datalist))
    assert message.startswith(
        f"error: {datalist} training[0]: moving_image {root / 'moving.nii.gz'} (shape (40, 48, 40)"
    )
    assert "are not on one grid" in message
    (root / "moving_label.nii.gz").unlink()
    assert error_of(lambda: fit(datalist)) == (
        f"error: {datalist} training[0]: moving_label {root / 'moving_label.nii.gz'} not found "
        f"(relative paths are resolved against {root})"
    )
