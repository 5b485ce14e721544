"""tools/prepare_lpba40.py on a small fake LPBA40 tree (Analyze .img/.hdr with a trailing singleton axis)."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from tools import prepare_lpba40 as prep

SHAPE = (60, 70, 50)
ZOOMS = (1.0, 1.5, 1.0)  # anisotropic like LPBA40's 1.5 mm coronal slices: exercises the 1 mm resampling
BRAIN = (slice(10, 50), slice(8, 62), slice(6, 44))
SUBJECTS = [f"S{i:02d}" for i in range(1, 9)]
CHECKED = {21: 1, 34: 14, 41: 15, 68: 32, 101: 45, 166: 54, 182: 56}  # original id -> new id


def block_slots():
    """4x4x4 block origins on a 6-voxel grid, all inside BRAIN."""
    return [(x, y, z) for x in range(12, 44, 6) for y in range(10, 56, 6) for z in range(8, 38, 6)]


def write_analyze(data, path):
    # trailing singleton 4th axis as in LPBA40; Analyze stores only the voxel sizes of this affine
    img = nib.AnalyzeImage(data[..., None], np.diag(ZOOMS + (1.0,)))
    nib.save(img, str(path))


def make_fake_lpba40(root, subjects, seed=0, bad_label=None):
    """<root>/delineation_space/SNN/SNN.delineation.{skullstripped,structure.label}.img (+ .hdr)."""
    rng = np.random.default_rng(seed)
    slots = block_slots()
    painted = {}
    for k, subject in enumerate(subjects):
        folder = root / "delineation_space" / subject
        folder.mkdir(parents=True)
        image = np.zeros(SHAPE, np.int16)
        image[BRAIN] = rng.integers(200, 1000, size=image[BRAIN].shape)
        labels = np.zeros(SHAPE, np.int16)
        extra = rng.choice([i for i in prep.LPBA40_LABEL_IDS if i not in CHECKED], size=10, replace=False)
        ids = sorted(CHECKED) + sorted(int(i) for i in extra) if k == 0 else sorted(int(i) for i in extra)
        if bad_label is not None and k == 0:
            ids.append(bad_label)
        positions = [slots[j] for j in rng.permutation(len(slots))[: len(ids)]]
        for label, (x, y, z) in zip(ids, positions):
            labels[x : x + 4, y : y + 4, z : z + 4] = label
        painted[subject] = ids
        write_analyze(image, folder / f"{subject}.delineation.skullstripped.img")
        write_analyze(labels, folder / f"{subject}.delineation.structure.label.img")
    return painted


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lpba40")
    painted = make_fake_lpba40(tmp / "LPBA40", SUBJECTS)
    out = tmp / "out"
    assert prep.main(["--root", str(tmp / "LPBA40"), "--out", str(out), "--subjects", *SUBJECTS]) == 0
    return tmp, out, painted


def test_volumes_are_ras_cropped_scaled_and_in_place(prepared):
    tmp, out, _ = prepared
    for subject in SUBJECTS:
        img = nib.load(str(out / "images" / f"{subject}_T1w.nii.gz"))
        lab = nib.load(str(out / "labels" / f"{subject}_label.nii.gz"))
        assert img.shape == lab.shape == prep.TARGET_SHAPE
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.affine, lab.affine)
        assert np.allclose(img.header.get_zooms(), 1.0)
        assert lab.get_data_dtype() == np.uint8
    data = img.get_fdata()
    assert data.min() >= 0 and data.max() <= 1 and data.max() == pytest.approx(1.0)
    coords = np.argwhere(data > 0)  # the brain's bounding box is centred in the crop
    centre = (coords.min(axis=0) + coords.max(axis=0) + 1) / 2
    assert np.allclose(centre, np.array(prep.TARGET_SHAPE) / 2, atol=1)
    assert len(coords) == pytest.approx(40 * 54 * 1.5 * 38, rel=0.05)  # whole brain kept, ~1 mm voxels

    # the label block of id 21 stays at the same world position through reorientation, resampling and crop
    src = nib.load(str(tmp / "LPBA40" / "delineation_space" / "S01" / "S01.delineation.structure.label.hdr"))
    src_vox = np.argwhere(np.asanyarray(src.dataobj)[..., 0] == 21).mean(axis=0)
    out_img = nib.load(str(out / "labels" / "S01_label.nii.gz"))
    out_vox = np.argwhere(np.asanyarray(out_img.dataobj) == 1).mean(axis=0)
    assert np.allclose(
        nib.affines.apply_affine(src.affine, src_vox), nib.affines.apply_affine(out_img.affine, out_vox), atol=1.0
    )


def test_labels_are_remapped_to_1_56(prepared):
    _, out, painted = prepared
    lab = np.asanyarray(nib.load(str(out / "labels" / "S01_label.nii.gz")).dataobj)
    present = set(np.unique(lab).tolist()) - {0}
    assert present == {prep.LABEL_MAP[i] for i in painted["S01"]}
    assert all(new in present for new in CHECKED.values())
    assert prep.LABEL_MAP == {orig: new for orig, new in zip(prep.LPBA40_LABEL_IDS, range(1, 57))}
    assert {o: prep.LABEL_MAP[o] for o in CHECKED} == CHECKED
    for subject in SUBJECTS[1:]:
        lab = np.asanyarray(nib.load(str(out / "labels" / f"{subject}_label.nii.gz")).dataobj)
        assert set(np.unique(lab).tolist()) - {0} == {prep.LABEL_MAP[i] for i in painted[subject]}
    datalist = json.loads((out / "datalist.json").read_text())
    assert len(datalist["labels"]) == 56
    assert {datalist["labels"][str(new)] for new in range(1, 57)} == set(prep.LPBA40_LABEL_IDS)
    assert all(datalist["labels"][str(new)] == orig for orig, new in CHECKED.items())


def test_datalist_split_and_pairs(prepared):
    _, out, _ = prepared
    datalist = json.loads((out / "datalist.json").read_text())
    subjects = datalist["subjects"]
    assert {k: len(v) for k, v in subjects.items()} == {"training": 4, "validation": 2, "test": 2}
    assert subjects == {"training": SUBJECTS[:4], "validation": SUBJECTS[4:6], "test": SUBJECTS[6:]}
    assert sorted(sum(subjects.values(), [])) == SUBJECTS  # every subject in exactly one split
    assert len(datalist["training"]) == 4 * 3  # all ordered pairs of distinct subjects
    keys = ("fixed_image", "moving_image", "fixed_label", "moving_label")
    for split in prep.SPLITS:
        names = set()
        for pair in datalist[split]:
            assert set(keys) <= set(pair)
            assert all((out / pair[k]).is_file() for k in keys)
            fixed, moving = (pair[k].split("/")[-1][:3] for k in ("fixed_image", "moving_image"))
            assert fixed != moving and {fixed, moving} <= set(subjects[split])
            assert pair["fixed_label"] == f"labels/{fixed}_label.nii.gz"
            assert pair["name"] == f"{moving}_to_{fixed}"
            names.add(pair["name"])
        assert len(names) == len(datalist[split])
    for split in ("validation", "test"):  # every other subject registered to the split's first one
        assert [(p["fixed_image"], p["moving_image"]) for p in datalist[split]] == [
            (f"images/{subjects[split][0]}_T1w.nii.gz", f"images/{s}_T1w.nii.gz") for s in subjects[split][1:]
        ]


def test_split_sizes_and_seed():
    assert prep.split_sizes(40) == {"training": 30, "validation": 4, "test": 6}
    default = prep.split_subjects(prep.SUBJECTS)
    assert default["validation"] == ["S31", "S32", "S33", "S34"] and default["test"][0] == "S35"
    seeded = prep.split_subjects(prep.SUBJECTS, seed=3)
    assert seeded == prep.split_subjects(prep.SUBJECTS, seed=3) != default
    assert {k: len(v) for k, v in seeded.items()} == {"training": 30, "validation": 4, "test": 6}
    assert sorted(sum(seeded.values(), [])) == prep.SUBJECTS
    for n in range(3, 41):
        sizes = prep.split_sizes(n)
        assert sum(sizes.values()) == n and sizes["test"] >= 1 and sizes["training"] >= 2
    datalist = prep.build_datalist(default, None, 1.0)
    assert [len(datalist[k]) for k in prep.SPLITS] == [30 * 29, 3, 5]


def test_root_may_be_delineation_space(prepared):
    tmp, _, _ = prepared
    base = tmp / "LPBA40" / "delineation_space"
    assert prep.resolve_delineation_dir(tmp / "LPBA40") == base
    assert prep.resolve_delineation_dir(base) == base
    with pytest.raises(SystemExit, match="delineation_space"):
        prep.resolve_delineation_dir(tmp / "out")


def test_unexpected_label_id_names_file(tmp_path):
    make_fake_lpba40(tmp_path / "LPBA40", SUBJECTS[:3], bad_label=99)
    with pytest.raises(SystemExit) as err:
        prep.main(["--root", str(tmp_path / "LPBA40"), "--out", str(tmp_path / "out"), "--subjects", *SUBJECTS[:3]])
    message = str(err.value)
    assert message.startswith("error:") and "S01.delineation.structure.label.img" in message and "99" in message
    assert not list((tmp_path / "out" / "images").glob("*.nii.gz"))  # nothing half-written


def test_missing_subject_or_file_is_a_clear_error(prepared, tmp_path):
    tmp, _, _ = prepared
    with pytest.raises(SystemExit, match=r"error: missing LPBA40 subject folder.*S09"):
        prep.main(["--root", str(tmp / "LPBA40"), "--out", str(tmp_path / "out"), "--subjects", *SUBJECTS, "S09"])
    with pytest.raises(SystemExit, match="S09"):  # default: all 40 subjects expected
        prep.main(["--root", str(tmp / "LPBA40"), "--out", str(tmp_path / "out")])

    root = tmp_path / "LPBA40"
    make_fake_lpba40(root, SUBJECTS[:3])
    shutil.copytree(root / "delineation_space", tmp_path / "copy" / "delineation_space")
    (root / "delineation_space" / "S02" / "S02.delineation.skullstripped.hdr").unlink()
    with pytest.raises(SystemExit, match=r"(?s)error: missing LPBA40 file.*S02\.delineation\.skullstripped\.hdr"):
        prep.main(["--root", str(root), "--out", str(tmp_path / "out"), "--subjects", *SUBJECTS[:3]])
    (tmp_path / "copy" / "delineation_space" / "S03" / "S03.delineation.structure.label.img").unlink()
    with pytest.raises(SystemExit, match=r"S03\.delineation\.structure\.label\.img"):
        prep.main(
            [
                "--root",
                str(tmp_path / "copy" / "delineation_space"),
                "--out",
                str(tmp_path / "out"),
                "--subjects",
                "1",
                "2",
                "3",
            ]
        )
    assert not (tmp_path / "out" / "datalist.json").exists()
