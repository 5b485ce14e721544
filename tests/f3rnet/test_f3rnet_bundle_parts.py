"""Unit tests of the f3rnet_ct_mri bundle's pipeline pieces: intensity normalisation per direction, input checks,
the label one-hot helper, warping, the training step and the checkpoint re-save (the evaluation's pieces:
test_f3rnet_evaluate.py)."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from tests.f3rnet.bundle_import import load_f3rnet
from tests.helpers import save_nifti

torch.set_num_threads(1)

# one purge, then one consistent module graph (a second load_f3rnet would re-import `checks`, and
# BundleInputError raised by `transforms` would no longer be `checks.BundleInputError`)
checks = load_f3rnet("checks")
transforms = importlib.import_module("scripts.transforms")
metrics = importlib.import_module("scripts.metrics")
engine = importlib.import_module("scripts.engine")
common = importlib.import_module("scripts.common")
networks = importlib.import_module("scripts.networks")
losses = importlib.import_module("scripts.losses")


def _pair(ct_values, mr_values):
    ct = MetaTensor(torch.tensor(ct_values, dtype=torch.float32).reshape(1, 1, 1, -1))
    mr = MetaTensor(torch.tensor(mr_values, dtype=torch.float32).reshape(1, 1, 1, -1))
    return ct, mr


@pytest.mark.parametrize("direction", ["ct2mri", "mri2ct"])
def test_normalisation_uses_the_ct_window_for_ct_and_percentiles_for_mr(direction):
    ct, mr = _pair([-1000, -300, 100, 500, 1500], [0, 100, 200, 300, 400])
    moving, fixed = (ct, mr) if direction == "ct2mri" else (mr, ct)
    out = transforms.NormalizeCTMRd(direction, mr_percentiles=(0, 100))({"moving_image": moving, "fixed_image": fixed})
    ct_out = out["moving_image" if direction == "ct2mri" else "fixed_image"]
    mr_out = out["fixed_image" if direction == "ct2mri" else "moving_image"]
    torch.testing.assert_close(ct_out.flatten(), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    torch.testing.assert_close(mr_out.flatten(), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    assert isinstance(ct_out, MetaTensor)


def test_mr_upper_percentile_clips_the_brightest_voxels():
    mr = MetaTensor(torch.cat([torch.linspace(0, 1, 999), torch.tensor([50.0])]).reshape(1, 10, 10, 10))
    out = transforms.NormalizeCTMRd("mri2ct")({"moving_image": mr, "fixed_image": mr.clone()})["moving_image"]
    assert float(out.max()) == 1.0 and float(out.min()) == 0.0
    assert float((out == 1).float().sum()) <= 11  # the outlier does not squash the rest of the range
    assert 0.45 < float(out.flatten()[499]) < 0.55


def test_invalid_direction_and_windows_are_rejected():
    with pytest.raises(checks.BundleInputError, match="ct2mri, mri2ct"):
        transforms.NormalizeCTMRd("mr2ct")
    with pytest.raises(ValueError, match="ct_window"):
        transforms.NormalizeCTMRd("ct2mri", ct_window=(500, -300))


def test_datalist_direction_mismatch_and_empty_section(tmp_path):
    img = save_nifti(np.zeros((16, 16, 16), np.float32), tmp_path / "a.nii.gz")
    item = {"fixed_image": img.name, "moving_image": img.name}
    (tmp_path / "dl.json").write_text(json.dumps({"direction": "mri2ct", "training": [item], "test": []}))
    with pytest.raises(checks.BundleInputError, match="is for direction 'mri2ct' but the bundle runs 'ct2mri'"):
        checks.checked_pairs(str(tmp_path / "dl.json"), str(tmp_path), "training", direction="ct2mri")
    assert checks.checked_pairs(str(tmp_path / "dl.json"), str(tmp_path), "training", 16, direction="mri2ct")
    with pytest.raises(checks.BundleInputError, match="no items in its 'test' list"):
        checks.checked_pairs(str(tmp_path / "dl.json"), str(tmp_path), "test", direction="mri2ct")


def test_label_outside_its_image_and_one_sided_file_pair_are_rejected(tmp_path):
    img = save_nifti(np.zeros((16, 16, 16), np.float32), tmp_path / "a.nii.gz")
    # a label on another grid is resampled onto its image's (tests/test_label_geometry.py); one that lies wholly
    # outside its image's field of view is refused
    label = save_nifti(np.zeros((16, 16, 12), np.uint8), tmp_path / "l.nii.gz", origin=(40.0, 0.0, 0.0))
    with pytest.raises(checks.BundleInputError, match=f"{label} \\('moving_label'\\): the label .* does not overlap"):
        checks.check_pairs([{"fixed_image": str(img), "moving_image": str(img), "moving_label": str(label)}])
    with pytest.raises(checks.BundleInputError, match="give both --moving_image and --fixed_image"):
        checks.inference_pairs("unused.json", ".", "test", moving_image=str(img))
    pairs = checks.inference_pairs("unused.json", ".", "test", 16, "ct2mri", str(img), str(img))
    assert pairs == [{"moving_image": str(img), "fixed_image": str(img), "name": "a"}]


def test_check_weights_accepts_ddp_style_wrappers_and_names_the_network_and_hint(tmp_path):
    net = networks.F3RNet("all", fr_channels=4, ms_channels=8)
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    assert checks.check_weights(str(path), SimpleNamespace(module=net)) == str(path)
    ddp_saved = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, ddp_saved)
    assert checks.check_weights(str(ddp_saved), net) == str(ddp_saved)
    # the config passes the variant as the hint (inference.json)
    with pytest.raises(checks.BundleInputError, match="network F3RNet: .*F3RNet variant 'none'"):
        checks.check_weights(
            str(path),
            networks.F3RNet("none", fr_channels=4, ms_channels=8),
            hint="F3RNet variant 'none': check --variant",
        )


def test_label_one_hot_maps_stray_ids_to_background():
    label = torch.tensor([0, 1, 2, 4, 7, -1], dtype=torch.float32).reshape(1, 1, 1, 1, 6)
    out = metrics.label_one_hot(label, 5)
    assert out.shape == (1, 5, 1, 1, 6) and out.dtype == torch.float32
    assert out[0, :, 0, 0].argmax(0).tolist() == [0, 1, 2, 4, 0, 0]
    assert torch.equal(out.sum(1), torch.ones(1, 1, 1, 6))


def test_warp_moving_keeps_metadata_and_label_values():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    ddf = MetaTensor(torch.zeros(3, 8, 8, 8), affine=affine)
    ddf[0] = 1.0  # one voxel along the first axis
    image = torch.arange(8.0)[:, None, None].expand(8, 8, 8)[None].clone()
    label = (torch.arange(8)[:, None, None].expand(8, 8, 8)[None] % 3).to(torch.uint8)
    out = transforms.WarpMovingd(image_key="moving_raw")({"pred": ddf, "moving_raw": image, "moving_label": label})
    torch.testing.assert_close(out["warped_moving_raw"][0, :7].as_tensor(), image[0, 1:])
    assert out["warped_moving_label"].dtype == torch.uint8
    assert torch.equal(out["warped_moving_label"][0, :7].as_tensor(), label[0, 1:])
    assert torch.equal(out["warped_moving_label"].affine, affine.double())


def test_train_step_lowers_the_loss_on_a_shifted_pair():
    torch.manual_seed(0)
    fixed = torch.zeros(1, 1, 16, 16, 16)
    fixed[..., 4:12, 4:12, 4:12] = 1.0
    moving = torch.roll(fixed, 1, dims=2) * 0.5 + 0.2  # shifted, other intensities ("modality")
    net = networks.F3RNet("all", fr_channels=4, ms_channels=8)
    loss = losses.F3RNetLoss(lam=1.5, mind_penalty="l1")
    state = SimpleNamespace(
        state=SimpleNamespace(device=torch.device("cpu")),
        network=net,
        amp=False,
        inferer=SimpleInferer(),
        optimizer=torch.optim.Adam(net.parameters(), lr=1e-3),
    )
    step = engine.F3RNetTrainStep(loss, grad_clip_norm="None")
    first = step(state, {"moving_image": moving, "fixed_image": fixed})
    assert set(first) == {"loss", "similarity", "smoothness", "max_abs_ddf"}
    for _ in range(15):
        last = step(state, {"moving_image": moving, "fixed_image": fixed})
    assert last["similarity"] < first["similarity"]
    clipped = engine.F3RNetTrainStep(loss, grad_clip_norm=1e-6)
    before = [p.detach().clone() for p in net.parameters()]
    state.optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    clipped(state, {"moving_image": moving, "fixed_image": fixed})
    change = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(net.parameters(), before)))
    assert float(change) <= 1e-6 * 1.01  # one SGD step of lr 1 moves by at most the clipped norm


def test_save_state_dict_on_cpu_strips_ddp_prefix_and_exports(tmp_path):
    net = networks.F3RNet("all", fr_channels=4, ms_channels=8)
    src = tmp_path / "model.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, src)
    common.save_state_dict_on_cpu(str(src), str(tmp_path / "sub" / "model_all.pt"))
    state = torch.load(tmp_path / "sub" / "model_all.pt", weights_only=True)
    networks.F3RNet("all", fr_channels=4, ms_channels=8).load_state_dict(state)  # strict
    common.save_state_dict_on_cpu(str(tmp_path / "absent.pt"))  # nothing trained: no error, nothing written
    assert not (tmp_path / "absent.pt").exists()
