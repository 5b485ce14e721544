"""scripts/common.py, the helpers every bundle carries an identical copy of (tested once, on rem_sr's copy)."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor

from tests.helpers import load_bundle_scripts

common = load_bundle_scripts("rem_sr", "common")


def test_case_names_use_the_datalist_name_else_the_file_stem():
    image = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/data/anatomical_T1w.nii.gz"})
    batch = [{"name": "oasis_template", "image": image}, {"image": image}]
    assert common.CaseNames()(batch) == [{"filename_or_obj": "oasis_template"}, {"filename_or_obj": "anatomical_T1w"}]
    moving = MetaTensor(torch.zeros(1, 2, 2, 2), meta={"filename_or_obj": "/d/ct/case011_ct.nii.gz"})
    assert common.CaseNames("moving_image")([{"moving_image": moving}]) == [{"filename_or_obj": "case011_ct"}]
    collated = {"name": ["a", "b"], "moving_image": torch.zeros(2, 1, 2, 2, 2)}
    assert common.CaseNames("moving_image")(collated) == [{"filename_or_obj": "a"}, {"filename_or_obj": "b"}]
    assert common.case_name({"image": "/x/sub-01_T1w.nii.gz"}) == "sub-01_T1w"
    assert common.case_name({"image": MetaTensor(torch.zeros(1, 2, 2, 2))}) == "case"  # made in memory: no file
    batched = MetaTensor(torch.zeros(1, 1, 2, 2, 2), meta={"filename_or_obj": ["/data/images/sub3_T1w.nii.gz"]})
    batched.is_batch = True
    assert common.CaseNames("moving_image")({"moving_image": batched}) == [{"filename_or_obj": "sub3_T1w"}]


@pytest.mark.parametrize("value, expected", [(True, True), ("false", False), (" Yes ", True), ("0", False), (1, 1)])
def test_config_flag_parses_command_line_booleans(value, expected):
    assert common.config_flag(value, "amp") is bool(expected)


@pytest.mark.parametrize("value", ["maybe", 2, None, 0.5])
def test_config_flag_rejects_anything_else_naming_the_key(value):
    with pytest.raises(common.BundleInputError, match="amp must be true or false"):
        common.config_flag(value, "amp")


def test_checked_state_unwraps_checkpoints_and_ddp_prefixes(tmp_path):
    net = torch.nn.Conv3d(1, 2, 3)
    for name, payload in {
        "plain": net.state_dict(),
        "ckpt": {"model": net.state_dict(), "optimizer": {}},
        "ddp": {f"module.{k}": v for k, v in net.state_dict().items()},
    }.items():
        torch.save(payload, tmp_path / f"{name}.pt")
        state = common.checked_state(str(tmp_path / f"{name}.pt"), net)
        assert set(state) == set(net.state_dict())
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(
        common.BundleInputError,
        match=r"bad.pt: weights do not match the configured network Conv3d: "
        r"1 missing \(e.g. bias\); 1 of wrong shape .* use X",
    ):
        common.checked_state(str(tmp_path / "bad.pt"), net, hint="use X")


def test_save_state_dict_on_cpu_unwraps_and_exports(tmp_path):
    net = torch.nn.Linear(2, 2)
    torch.save({"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ckpt.pt")
    common.save_state_dict_on_cpu(str(tmp_path / "ckpt.pt"), str(tmp_path / "out" / "model.pt"))
    assert set(torch.load(tmp_path / "out" / "model.pt", weights_only=True)) == {"weight", "bias"}
    common.save_state_dict_on_cpu(str(tmp_path / "absent.pt"))  # nothing trained: nothing written, no error
    assert not (tmp_path / "absent.pt").exists()
    assert not list(tmp_path.rglob(".partial-*"))


def test_atomic_writes_leave_no_partial_file(tmp_path):
    common.atomic_write_text(tmp_path / "a" / "b.txt", "x")
    assert (tmp_path / "a" / "b.txt").read_text() == "x"
    assert not list(tmp_path.rglob(".partial-*"))


def test_step_decay_with_floor():
    f = common.StepDecayWithFloor(base_lr=1e-3, gamma=0.5, step=10, min_lr=2e-4)
    assert [f(i) for i in (0, 9, 10, 20, 100)] == [1.0, 1.0, 0.5, 0.25, 0.2]
    with pytest.raises(ValueError):
        common.StepDecayWithFloor(1e-3, 0.5, 0, 1e-4)


def test_load_datalist_resolves_image_paths_under_any_key_and_leaves_names_alone(tmp_path):
    import json

    import nibabel as nib
    import numpy as np

    (tmp_path / "case1").mkdir()  # a folder named like the case: MONAI alone would turn the name into a path
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), str(tmp_path / "case1" / "m.nii.gz"))
    (tmp_path / "dl.json").write_text(
        json.dumps({"test": [{"name": "case1", "moving_image": "case1/m.nii.gz", "fixed_image": "case1/m.nii.gz"}]})
    )
    (item,) = common.load_datalist(str(tmp_path / "dl.json"), str(tmp_path), "test")
    assert item == {
        "name": "case1",
        "moving_image": str(tmp_path / "case1" / "m.nii.gz"),
        "fixed_image": str(tmp_path / "case1" / "m.nii.gz"),
    }
