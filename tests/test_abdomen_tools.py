"""tools/make_abdomen_phantoms.py and tools/prepare_learn2reg_abdomen.py on tiny synthetic data."""

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from tools import make_abdomen_phantoms as phantoms
from tools import prepare_learn2reg_abdomen as l2r

SHAPE = (48, 48, 40)
CASES = ["case000", "case001", "case002"]


def load(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    assert phantoms.main(["--out", str(out), "--n-subjects", "3", "--seed", "0", "--shape", *map(str, SHAPE)]) == 0
    return out


@pytest.fixture(scope="module")
def subjects():
    # the CLI draws subject i from default_rng([seed, i])
    return [phantoms.make_subject(np.random.default_rng([0, i]), SHAPE) for i in range(len(CASES))]


# ------------------------------------------------------------------------------------------------
# phantoms
# ------------------------------------------------------------------------------------------------


def test_phantom_files_shapes_and_labels(phantom_dir, subjects):
    for case, subject in zip(CASES, subjects):
        ct, ct_img = load(phantom_dir / "ct" / f"{case}_ct.nii.gz")
        mr, mr_img = load(phantom_dir / "mr" / f"{case}_mr.nii.gz")
        ct_label, _ = load(phantom_dir / "labels" / f"{case}_ct_label.nii.gz")
        mr_label, _ = load(phantom_dir / "labels" / f"{case}_mr_label.nii.gz")
        for img in (ct_img, mr_img):
            assert img.shape == SHAPE
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert np.allclose(img.header.get_zooms()[:3], 1.0)
            assert np.allclose(img.affine @ [*((np.array(SHAPE) - 1) / 2), 1], [0, 0, 0, 1])  # centred
        assert ct.dtype == np.int16 and mr.dtype == np.float32
        assert ct_label.dtype == np.uint8 and mr_label.dtype == np.uint8
        # the files hold exactly what make_subject returns for (seed, i)
        assert np.array_equal(ct, np.round(subject["ct"]).astype(np.int16))
        assert np.array_equal(mr, subject["mr"])
        assert np.array_equal(ct_label, subject["ct_label"]) and np.array_equal(mr_label, subject["mr_label"])
        for label in (ct_label, mr_label):
            assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
            volumes = np.bincount(label.ravel(), minlength=5)[1:]
            assert volumes.argmax() == 0  # the liver is the largest organ
            assert volumes[0] > 3 * volumes[1:].max()


def test_phantom_intensities(subjects):
    for s in subjects:
        ct, mr, label, tissue = s["ct"], s["mr"], s["ct_label"], s["ct_tissue"]
        assert ct.min() >= -1024 and ct.max() <= 3071
        assert ct.min() < -900  # air outside the body
        assert (ct > 300).any()  # bone
        liver_ct, spleen_ct = np.median(ct[label == 1]), np.median(ct[label == 2])
        assert 35 < liver_ct < 85 and 20 < spleen_ct < 70 and liver_ct > spleen_ct
        fat = ndimage.binary_erosion(np.isin(tissue, [phantoms.SUBCUT_FAT, phantoms.VISCERAL_FAT]))
        assert -150 < np.median(ct[fat]) < -40
        # MR T1: fat bright, liver brighter than spleen; the contrast is not a rescaled CT
        mr_label = s["mr_label"]
        liver_mr, spleen_mr = np.median(mr[mr_label == 1]), np.median(mr[mr_label == 2])
        assert mr.min() >= 0 and liver_mr > spleen_mr
        mr_fat = ndimage.binary_erosion(
            np.isin(phantoms.warp(tissue, s["displacement"], 0), [phantoms.SUBCUT_FAT, phantoms.VISCERAL_FAT])
        )
        assert np.median(mr[mr_fat]) > liver_mr
        assert np.median(ct[fat]) < liver_ct  # inverted fat/liver contrast between CT and MR
        assert not np.allclose(ct, mr)


def test_same_seed_is_bit_identical_and_seeds_differ(phantom_dir, tmp_path):
    again = tmp_path / "again"
    assert phantoms.main(["--out", str(again), "--n-subjects", "3", "--seed", "0", "--shape", *map(str, SHAPE)]) == 0
    files = sorted(p.relative_to(phantom_dir) for p in phantom_dir.rglob("*") if p.is_file())
    assert len(files) == 4 * len(CASES) + 2
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert sha256(phantom_dir / rel) == sha256(again / rel), rel
    a = phantoms.make_subject(np.random.default_rng([0, 0]), SHAPE)
    b = phantoms.make_subject(np.random.default_rng([1, 0]), SHAPE)
    assert not np.array_equal(a["ct"], b["ct"])
    assert not np.array_equal(a["ct_label"], b["ct_label"])


def test_known_deformation_largest_on_liver(subjects):
    scale = phantoms.shape_scale(SHAPE)
    for s in subjects:
        ct_label, mr_label, disp = s["ct_label"], s["mr_label"], s["displacement"]
        assert disp.shape == (3,) + SHAPE and disp.dtype == np.float32
        # the displacement is the true CT->MRI DDF: warping the CT labels with it gives the MR labels
        assert np.array_equal(phantoms.warp(ct_label, disp, order=0), mr_label)
        assert (ct_label != mr_label).mean() > 0.002
        v_ct = np.bincount(ct_label.ravel(), minlength=5)[1:]
        v_mr = np.bincount(mr_label.ravel(), minlength=5)[1:]
        assert np.all(np.abs(v_mr - v_ct) / v_ct < 0.2), (v_ct, v_mr)
        magnitude = np.sqrt((disp**2).sum(0))
        mean = [magnitude[mr_label == k].mean() for k in range(1, 5)]
        assert mean[0] > 1.3 * mean[2] and mean[0] > 1.3 * mean[3], mean  # liver vs each kidney
        assert 0.7 * 8 * scale < magnitude[mr_label == 1].max() < 1.5 * 12 * scale
        # smooth and invertible: no folding
        grads = [np.gradient(disp[i]) for i in range(3)]
        jac = np.stack([np.stack([grads[i][j] + (i == j) for j in range(3)], -1) for i in range(3)], -2)
        assert np.linalg.det(jac).min() > 0


def test_phantom_datalists(phantom_dir):
    lists = {d: json.loads((phantom_dir / f"datalist_{d}.json").read_text()) for d in ("ct2mri", "mri2ct")}
    for datalist in lists.values():
        assert [len(datalist[k]) for k in ("training", "validation", "test")] == [1, 1, 1]
        names = [{i["name"] for i in datalist[k]} for k in ("training", "validation", "test")]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        for item in datalist["training"] + datalist["validation"] + datalist["test"]:
            assert set(item) == {"fixed_image", "moving_image", "fixed_label", "moving_label", "name"}
            for key in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
                assert (phantom_dir / item[key]).is_file()
    ct2mri, mri2ct = lists["ct2mri"]["test"][0], lists["mri2ct"]["test"][0]
    assert ct2mri["fixed_image"] == "mr/case002_mr.nii.gz" and ct2mri["moving_image"] == "ct/case002_ct.nii.gz"
    assert ct2mri["fixed_label"] == "labels/case002_mr_label.nii.gz"
    assert mri2ct["fixed_image"] == ct2mri["moving_image"] and mri2ct["moving_image"] == ct2mri["fixed_image"]
    assert mri2ct["fixed_label"] == ct2mri["moving_label"] and mri2ct["moving_label"] == ct2mri["fixed_label"]
    assert phantoms.split_sizes(12) == (8, 2, 2)


def test_phantom_rejects_too_few_subjects(tmp_path):
    with pytest.raises(SystemExit, match="error: --n-subjects"):
        phantoms.main(["--out", str(tmp_path / "x"), "--n-subjects", "2", "--shape", *map(str, SHAPE)])


# ------------------------------------------------------------------------------------------------
# Learn2Reg AbdomenMRCT preparation
# ------------------------------------------------------------------------------------------------

# source ids in a different order from ours, plus a label that must become background
FLAT_LABELS = {"0": "background", "1": "Spleen", "2": "liver", "3": "left kidney", "4": "Kidney_Right", "5": "stomach"}
SOURCE_TO_TARGET = {1: 2, 2: 1, 3: 4, 4: 3, 5: 0}
IN_SHAPE = (160, 40, 36)  # cropped along x, padded along y and z
IN_AFFINE = np.array([[-2.0, 0, 0, 150], [0, 2, 0, -40], [0, 0, 2, -30], [0, 0, 0, 1]])  # LAS on disk
BLOBS = {
    1: (slice(30, 40), slice(5, 15), slice(5, 12)),
    2: (slice(60, 100), slice(10, 30), slice(10, 25)),
    3: (slice(110, 120), slice(5, 15), slice(20, 30)),
    4: (slice(40, 50), slice(25, 35), slice(20, 30)),
    5: (slice(70, 80), slice(30, 38), slice(2, 8)),
}


def make_l2r_tree(root, n_cases=3, labels=FLAT_LABELS):
    rng = np.random.default_rng(0)
    for sub in ("imagesTr", "labelsTr", "masksTr"):
        (root / sub).mkdir(parents=True)
    for case in range(1, n_cases + 1):
        label = np.zeros(IN_SHAPE, np.uint8)
        for source_id, box in BLOBS.items():
            label[box] = source_id
        mask = np.zeros(IN_SHAPE, np.uint8)
        mask[20:140, 2:38, 1:35] = 1
        mr = np.where(mask > 0, rng.gamma(2.0, 100.0, IN_SHAPE), 0).astype(np.float32)
        mr[tuple(np.argwhere(mask > 0)[:50].T)] = 5000.0  # outliers for the percentile clip
        ct = rng.uniform(-1000, 1500, IN_SHAPE).astype(np.float32)
        for channel, data in ((0, mr), (1, ct)):
            name = f"AbdomenMRCT_{case:04d}_{channel:04d}.nii.gz"
            nib.save(nib.Nifti1Image(data, IN_AFFINE), str(root / "imagesTr" / name))
            nib.save(nib.Nifti1Image(label, IN_AFFINE), str(root / "labelsTr" / name))
            nib.save(nib.Nifti1Image(mask, IN_AFFINE), str(root / "masksTr" / name))

    def img(case, channel):
        return f"./imagesTr/AbdomenMRCT_{case:04d}_{channel:04d}.nii.gz"

    # both pair styles: fixed/moving (Learn2Reg 2021+) and channel keys
    pairs = [
        {"fixed": img(c, 0), "moving": img(c, 1)} if c % 2 else {"0000": img(c, 0), "0001": img(c, 1)}
        for c in range(1, n_cases + 1)
    ]
    dataset = {
        "name": "AbdomenMRCT",
        "modality": {"0": "MR", "1": "CT"},
        "labels": labels,
        "training_paired_images": pairs,
        "registration_val": [pairs[-1]],
    }
    (root / "AbdomenMRCT_dataset.json").write_text(json.dumps(dataset, indent=2))
    return root


def world_centroid(mask, affine):
    return (affine @ np.r_[np.argwhere(mask).mean(0), 1])[:3]


def test_prepare_learn2reg(tmp_path):
    root = make_l2r_tree(tmp_path / "AbdomenMRCT")
    out = tmp_path / "prepared"
    assert l2r.main(["--root", str(root), "--out", str(out)]) == 0
    raw_mr, raw_mr_img = load(root / "imagesTr" / "AbdomenMRCT_0001_0000.nii.gz")
    raw_label, raw_label_img = load(root / "labelsTr" / "AbdomenMRCT_0001_0000.nii.gz")
    ct, ct_img = load(out / "ct" / "AbdomenMRCT_0001_ct.nii.gz")
    mr, mr_img = load(out / "mr" / "AbdomenMRCT_0001_mr.nii.gz")
    for modality in ("mr", "ct"):
        label, label_img = load(out / "labels" / f"AbdomenMRCT_0001_{modality}_label.nii.gz")
        assert label.shape == (144, 144, 128) and label.dtype == np.uint8
        assert np.allclose(label_img.affine, ct_img.affine)
        assert set(np.unique(label).tolist()) == {0, 1, 2, 3, 4}
        for source_id, target in SOURCE_TO_TARGET.items():  # remapped by name, in place in world space
            if target:
                assert np.allclose(
                    world_centroid(label == target, label_img.affine),
                    world_centroid(raw_label == source_id, raw_label_img.affine),
                )
        mask, _ = load(out / "masks" / f"AbdomenMRCT_0001_{modality}_mask.nii.gz")
        assert set(np.unique(mask).tolist()) == {0, 1}
    for img in (ct_img, mr_img):
        assert img.shape == (144, 144, 128)
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms()[:3], 2.0)
    assert ct.min() == -300 and ct.max() == 500
    p99 = np.percentile(raw_mr[raw_mr != 0], 99)
    assert mr.max() <= p99 + 1e-3 and mr.max() == pytest.approx(p99, rel=1e-5)

    lists = {d: json.loads((out / f"datalist_{d}.json").read_text()) for d in ("ct2mri", "mri2ct")}
    ct2mri, mri2ct = lists["ct2mri"], lists["mri2ct"]
    assert [i["name"] for i in ct2mri["training"]] == ["AbdomenMRCT_0001", "AbdomenMRCT_0002"]
    assert [i["name"] for i in ct2mri["validation"]] == ["AbdomenMRCT_0003"]
    assert ct2mri["test"] == ct2mri["validation"] and "test = validation" in ct2mri["description"]
    first = ct2mri["training"][0]
    assert first["fixed_image"] == "mr/AbdomenMRCT_0001_mr.nii.gz"
    assert first["moving_image"] == "ct/AbdomenMRCT_0001_ct.nii.gz"
    assert first["fixed_label"] == "labels/AbdomenMRCT_0001_mr_label.nii.gz"
    swapped = mri2ct["training"][0]
    assert swapped["fixed_image"] == first["moving_image"] and swapped["moving_image"] == first["fixed_image"]
    assert swapped["fixed_label"] == first["moving_label"] and swapped["moving_label"] == first["fixed_label"]
    for item in ct2mri["training"] + ct2mri["validation"] + mri2ct["training"]:
        for key in ("fixed_image", "moving_image", "fixed_label", "moving_label", "fixed_mask", "moving_mask"):
            assert (out / item[key]).is_file()


def test_prepare_learn2reg_per_modality_labels(tmp_path):
    # Learn2Reg-style nested tables: each channel's labels are mapped with their own names
    ct_labels = {"1": "liver", "2": "spleen", "3": "right kidney", "4": "left kidney"}
    root = make_l2r_tree(tmp_path / "AbdomenMRCT", n_cases=2, labels={"0": FLAT_LABELS, "1": ct_labels})
    out = tmp_path / "prepared"
    assert l2r.main(["--root", str(root), "--out", str(out)]) == 0
    mr_label, _ = load(out / "labels" / "AbdomenMRCT_0001_mr_label.nii.gz")
    ct_label, _ = load(out / "labels" / "AbdomenMRCT_0001_ct_label.nii.gz")
    sizes = {k: int(np.prod([s.stop - s.start for s in box])) for k, box in BLOBS.items()}
    assert (mr_label == 1).sum() == sizes[2] and (ct_label == 1).sum() == sizes[1]  # "liver" is 2 on MR, 1 on CT
    assert (ct_label == 0).sum() == ct_label.size - sum(sizes[k] for k in (1, 2, 3, 4))


def test_prepare_learn2reg_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*AbdomenMRCT_dataset\.json not found"):
        (tmp_path / "empty").mkdir()
        l2r.main(["--root", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    root = make_l2r_tree(
        tmp_path / "missing_organ",
        n_cases=2,
        labels={"0": "background", "1": "liver", "2": "spleen", "3": "left kidney"},
    )
    with pytest.raises(SystemExit, match="error: .*'right kidney'"):
        l2r.main(["--root", str(root), "--out", str(tmp_path / "o")])
    root = make_l2r_tree(tmp_path / "missing_label", n_cases=2)
    missing = root / "labelsTr" / "AbdomenMRCT_0002_0001.nii.gz"
    missing.unlink()
    with pytest.raises(SystemExit, match=f"error: label file {re.escape(str(missing))}"):
        l2r.main(["--root", str(root), "--out", str(tmp_path / "o")])
    (root / "imagesTr" / "AbdomenMRCT_0001_0000.nii.gz").unlink()
    with pytest.raises(SystemExit, match="error: .*AbdomenMRCT_0001_0000.nii.gz not found"):
        l2r.main(["--root", str(root), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()  # nothing written on bad input


def test_learn2reg_resample_and_crop_keep_world_coordinates():
    data = np.zeros((40, 30, 20), np.float32)
    data[10:14, 5:9, 3:7] = 1
    affine = np.array([[2.0, 0, 0, 50], [0, 2, 0, -10], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    resampled, new_affine = l2r.resample(data, affine, 1.0, order=1)
    assert resampled.shape == (80, 60, 50) and np.allclose(l2r.spacing_of(new_affine), 1.0)
    cropped, crop_affine = l2r.crop_or_pad_centre(resampled, new_affine)
    assert cropped.shape == l2r.TARGET_SHAPE
    weights = cropped / cropped.sum()
    centroid = np.indices(cropped.shape).reshape(3, -1) @ weights.ravel()
    assert np.allclose((crop_affine @ np.r_[centroid, 1])[:3], world_centroid(data > 0.5, affine), atol=1e-4)


# ------------------------------------------------------------------------------------------------
# generator families: "random" (training variety) and "heldout" (what "random" never produces)
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family_subjects():
    return {
        family: [phantoms.make_subject(np.random.default_rng([0, i]), SHAPE, family) for i in range(4)]
        for family in ("random", "heldout")
    }


def _jacobian_det_min(disp):
    grads = [np.gradient(disp[i]) for i in range(3)]
    jac = np.stack([np.stack([grads[i][j] + (i == j) for j in range(3)], -1) for i in range(3)], -2)
    return np.linalg.det(jac).min()


@pytest.mark.parametrize("family", ["random", "heldout"])
def test_family_pairs_are_valid(family_subjects, family):
    for s in family_subjects[family]:
        shape = s["ct"].shape
        assert s["mr"].shape == s["ct_label"].shape == s["mr_label"].shape == shape
        assert s["displacement"].shape == (3,) + shape
        # the labels follow the images under the known warp, and every organ is there in both images
        assert np.array_equal(phantoms.warp(s["ct_label"], s["displacement"], order=0), s["mr_label"])
        assert set(np.unique(s["ct_label"])) == set(np.unique(s["mr_label"])) == {0, 1, 2, 3, 4}
        assert _jacobian_det_min(s["displacement"]) > 0
        assert np.isfinite(s["mr"]).all() and s["mr"].min() >= 0


def test_random_family_varies_grids_contrast_and_motion(family_subjects):
    subjects = family_subjects["random"]
    shapes = {s["ct"].shape for s in subjects}
    assert len(shapes) > 1 and all(n % 16 == 0 for shape in shapes for n in shape)
    # MR contrast drawn per tissue: the liver/spleen order flips between subjects, never on the default table
    order = [np.median(s["mr"][s["mr_label"] == 1]) > np.median(s["mr"][s["mr_label"] == 2]) for s in subjects]
    more = [phantoms.make_subject(np.random.default_rng([5, i]), SHAPE, "random") for i in range(6)]
    order += [np.median(s["mr"][s["mr_label"] == 1]) > np.median(s["mr"][s["mr_label"] == 2]) for s in more]
    assert any(order) and not all(order)
    # CT stays non-contrast: the liver's interior within 25 HU (+ noise) of its 60 HU
    for s in subjects + more:
        assert 25 < np.median(s["ct"][ndimage.binary_erosion(s["ct_label"] == 1, iterations=2)]) < 95
    # voxel spacings: half of the subjects at 1 mm, the others coarser (the same field of view on fewer voxels)
    spacings = [s["spacing"] for s in subjects + more]
    assert any(sp == (1.0, 1.0, 1.0) for sp in spacings) and any(min(sp) > 1.05 for sp in spacings)
    assert all(1.0 <= x <= 2.6 for sp in spacings for x in sp)
    largest = [np.sqrt((s["displacement"] ** 2).sum(0)).max() for s in subjects + more]
    assert max(largest) / min(largest) > 1.5  # deformation magnitudes vary


def test_heldout_family_is_outside_the_random_one(family_subjects):
    for s in family_subjects["heldout"]:
        # contrast-enhanced CT: liver and renal cortex far above anything the random family draws
        assert np.median(s["ct"][ndimage.binary_erosion(s["ct_label"] == 1, iterations=2)]) > 95
        assert np.percentile(s["ct"][s["ct_label"] == 3], 90) > 120
    # superellipsoid organs: an exponent-4 organ fills more of its bounding box than an ellipsoid (0.52)
    rng = np.random.default_rng(0)
    u, v, w = phantoms.normalised_axes((64, 64, 64))
    for exponent, low, high in ((2.0, 0.45, 0.58), (4.0, 0.7, 0.9)):
        organ = phantoms.Organ(rng, (0, 0, 0), (0.5, 0.5, 0.5), (0, 0, 0), 0, 0, 0, 0, exponent=exponent)
        inside = organ.field(u, v, w) < 0
        box = inside[16:48, 16:48, 16:48]
        assert low < box.mean() < high, (exponent, box.mean())


def test_family_cli_and_test_only_datalist(tmp_path):
    out = tmp_path / "heldout"
    argv = ["--out", str(out), "--n-subjects", "2", "--shape", *map(str, SHAPE), "--family", "heldout", "--test-only"]
    assert phantoms.main(argv) == 0
    datalist = json.loads((out / "datalist_ct2mri.json").read_text())
    assert datalist["family"] == "heldout"
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [0, 0, 2]
    out = tmp_path / "random"
    assert (
        phantoms.main(["--out", str(out), "--n-subjects", "3", "--shape", *map(str, SHAPE), "--family", "random"]) == 0
    )
    datalist = json.loads((out / "datalist_mri2ct.json").read_text())
    assert datalist["spatial_shape"] is None
    for item in datalist["training"] + datalist["validation"] + datalist["test"]:
        image = nib.load(str(out / item["fixed_image"]))
        label = nib.load(str(out / item["fixed_label"]))
        assert image.shape == label.shape and np.allclose(image.affine, label.affine)
        case = int(item["name"].removeprefix("case"))
        spacing = phantoms.make_subject(np.random.default_rng([0, case]), SHAPE, "random")["spacing"]
        assert np.allclose(image.header.get_zooms()[:3], spacing)  # the drawn spacing is in the header
        assert np.allclose(image.affine @ [*((np.array(image.shape) - 1) / 2), 1], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="family must be one of"):
        phantoms.make_subject(np.random.default_rng(0), SHAPE, "other")


def test_mix_with_writes_training_mixes_the_bundle_can_read(tmp_path):
    """--mix-with: the random family's training/validation subjects plus the sample phantoms', paths relative to
    the random folder (read back through the bundle's own datalist loader), test subjects the family's alone."""
    import importlib.util
    import sys

    default, random = tmp_path / "abdomen_phantoms", tmp_path / "random"
    shape = ["--shape", *map(str, SHAPE)]
    with pytest.raises(SystemExit, match="--mix-with: .*datalist_ct2mri.json not found"):
        phantoms.main(
            ["--out", str(random), "--n-subjects", "3", *shape, "--family", "random", "--mix-with", str(default)]
        )
    assert not random.exists()  # refused before any phantom is made
    assert phantoms.main(["--out", str(default), "--n-subjects", "3", *shape]) == 0
    argv = ["--out", str(random), "--n-subjects", "3", *shape, "--family", "random", "--mix-with", str(default)]
    assert phantoms.main(argv) == 0
    root = phantoms.REPO_ROOT / "bundles" / "f3rnet_ct_mri"
    spec = importlib.util.spec_from_file_location("f3_common_for_mix", root / "scripts" / "common.py")
    common = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = common
    spec.loader.exec_module(common)
    for direction, (fixed, moving) in {"ct2mri": ("mr", "ct"), "mri2ct": ("ct", "mr")}.items():
        own = json.loads((random / f"datalist_{direction}.json").read_text())
        mix = json.loads((random / f"datalist_mix_{direction}.json").read_text())
        assert mix["family"] == "random+default" and mix["test"] == own["test"]
        for split in ("training", "validation"):
            items = common.load_datalist(str(random / f"datalist_mix_{direction}.json"), str(random), split)
            assert len(items) == len(own[split]) + 1  # 3 subjects: one training, one validation, one test each
            added = items[-1]
            assert added["name"].startswith("abdomen_phantoms_case")
            assert f"/{fixed}/" in added["fixed_image"] and f"/{moving}/" in added["moving_image"]
            for key in ("fixed_image", "moving_image", "fixed_label", "moving_label"):
                assert Path(added[key]).resolve().parent.parent == default.resolve()
