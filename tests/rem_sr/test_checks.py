import json

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, save_nifti

checks = load_bundle_scripts("rem_sr", "checks")
networks = load_bundle_scripts("rem_sr", "networks")


def test_missing_file(tmp_path):
    with pytest.raises(checks.BundleInputError, match="file not found"):
        checks.check_volume_file(str(tmp_path / "nope.nii.gz"))


def test_not_3d(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10), np.float32), np.eye(4)), str(path))
    with pytest.raises(checks.BundleInputError, match="expected a 3D volume"):
        checks.check_volume_file(str(path))
    path4 = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10, 2), np.float32), np.eye(4)), str(path4))
    with pytest.raises(checks.BundleInputError, match="expected a 3D volume"):
        checks.check_volume_file(str(path4))


def test_singleton_fourth_axis_is_accepted(tmp_path):
    path = tmp_path / "img.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 11, 12, 1), np.float32), np.eye(4)), str(path))
    assert checks.check_volume_file(str(path)) == (10, 11, 12)


def test_nan(tmp_path):
    data = np.ones((8, 8, 8), np.float32)
    data[3, 3, 3] = np.nan
    path = save_nifti(data, tmp_path / "nan.nii.gz")
    with pytest.raises(checks.BundleInputError, match="NaN"):
        checks.check_volume_file(str(path))


def test_too_small(tmp_path):
    path = save_nifti(np.ones((8, 8, 3), np.float32), tmp_path / "small.nii.gz")
    with pytest.raises(checks.BundleInputError, match="smaller than the minimum"):
        checks.check_volume_file(str(path), min_size=4)


def test_wrong_weights(tmp_path):
    path = tmp_path / "k8.pt"
    torch.save(networks.REM(k=8).state_dict(), path)
    with pytest.raises(checks.BundleInputError, match="do not match") as info:
        checks.check_weights(str(path), networks.REM(k=16))
    assert str(path) in str(info.value)
    torch.save(networks.REM(k=16).state_dict(), path)
    assert checks.check_weights(str(path), networks.REM(k=16)) == str(path)


def test_missing_weights_and_garbage_weights(tmp_path):
    with pytest.raises(checks.BundleInputError, match="weights file not found"):
        checks.check_weights(str(tmp_path / "none.pt"), networks.REM())
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(checks.BundleInputError, match="not a loadable"):
        checks.check_weights(str(garbage), networks.REM())


def test_datalist_errors(tmp_path):
    with pytest.raises(checks.BundleInputError, match="datalist not found"):
        checks.load_datalist(str(tmp_path / "missing.json"), str(tmp_path), "test")
    (tmp_path / "empty.json").write_text(json.dumps({"test": []}))
    with pytest.raises(checks.BundleInputError, match="no items"):
        checks.load_datalist(str(tmp_path / "empty.json"), str(tmp_path), "test")
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"image": "absent.nii.gz"}]}))
    with pytest.raises(checks.BundleInputError, match="absent.nii.gz: file not found"):
        checks.checked_datalist(str(tmp_path / "dl.json"), str(tmp_path), "test", ["image"])


def test_load_checked_weights_takes_a_state_dict_or_a_training_checkpoint(tmp_path):
    torch.manual_seed(3)
    source = networks.REM(k=4, n=1)
    torch.save(source.state_dict(), tmp_path / "model.pt")
    # CheckpointSaver's training checkpoints hold the weights under "model", next to optimiser state
    torch.save({"model": source.state_dict(), "optimizer": {"state": {}}}, tmp_path / "checkpoint.pt")
    for name in ("model.pt", "checkpoint.pt"):
        target = checks.load_checked_weights(str(tmp_path / name), networks.REM(k=4, n=1))
        for key, value in source.state_dict().items():
            torch.testing.assert_close(target.state_dict()[key], value, rtol=0, atol=0)
    with pytest.raises(checks.BundleInputError, match="weights do not match the configured network REM"):
        checks.load_checked_weights(str(tmp_path / "checkpoint.pt"), networks.REM(k=8, n=1))
