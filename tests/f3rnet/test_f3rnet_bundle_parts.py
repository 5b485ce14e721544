"""Unit tests of the f3rnet_ct_mri bundle's pipeline pieces: intensity normalisation per direction, input checks,
metrics (Dice, ASD in mm, folding), warping, the training step and the checkpoint re-save."""

from __future__ import annotations

import importlib
import json
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.f3rnet.bundle_import import load_f3rnet
from tests.helpers import save_nifti

torch.set_num_threads(1)

# one purge, then one consistent module graph (a second load_f3rnet would re-import `checks`, and
# BundleInputError raised by `transforms` would no longer be `checks.BundleInputError`)
checks = load_f3rnet("checks")
transforms = importlib.import_module("scripts.transforms")
metrics = importlib.import_module("scripts.metrics")
engine = importlib.import_module("scripts.engine")
networks = importlib.import_module("scripts.networks")
losses = importlib.import_module("scripts.losses")
evaluate = importlib.import_module("scripts.evaluate")


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


def test_label_on_another_grid_and_one_sided_file_pair_are_rejected(tmp_path):
    img = save_nifti(np.zeros((16, 16, 16), np.float32), tmp_path / "a.nii.gz")
    label = save_nifti(np.zeros((16, 16, 12), np.uint8), tmp_path / "l.nii.gz")
    with pytest.raises(checks.BundleInputError, match=f"{label}: label grid"):
        checks.check_pairs([{"fixed_image": str(img), "moving_image": str(img), "moving_label": str(label)}])
    with pytest.raises(checks.BundleInputError, match="give both --moving_image and --fixed_image"):
        checks.inference_pairs("unused.json", ".", "test", moving_image=str(img))
    pairs = checks.inference_pairs("unused.json", ".", "test", 16, "ct2mri", str(img), str(img))
    assert pairs == [{"moving_image": str(img), "fixed_image": str(img)}]


def test_check_weights_accepts_ddp_style_wrappers_and_names_the_variant(tmp_path):
    net = networks.F3RNet("all", fr_channels=4, ms_channels=8)
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    assert checks.check_weights(str(path), SimpleNamespace(module=net)) == str(path)
    with pytest.raises(checks.BundleInputError, match="F3RNet variant 'none'"):
        checks.check_weights(str(path), networks.F3RNet("none", fr_channels=4, ms_channels=8))


def _cube(shape=(24, 24, 24), lo=6, hi=14, shift=0, value=1):
    lab = torch.zeros(shape)
    lab[lo + shift:hi + shift, lo:hi, lo:hi] = value
    return lab[None, None]


def test_dice_and_asd_per_organ():
    fixed = _cube() + _cube(lo=16, hi=20, value=2)
    assert metrics.organ_dice(fixed, fixed, 3).tolist() == [1.0, 1.0]
    assert metrics.organ_asd(fixed, fixed, 3, [1, 1, 1]).tolist() == [0.0, 0.0]
    moved = _cube(shift=2) + _cube(lo=16, hi=20, value=2)
    dice = metrics.organ_dice(moved, fixed, 3)
    assert dice[0] == pytest.approx(2 * 6 * 64 / (2 * 8 * 64)) and dice[1] == 1.0
    asd_1mm = metrics.organ_asd(moved, fixed, 3, [1.0, 1.0, 1.0])
    asd_2mm = metrics.organ_asd(moved, fixed, 3, [2.0, 2.0, 2.0])
    assert 0 < asd_1mm[0] <= 2 and asd_1mm[1] == 0
    assert asd_2mm[0] == pytest.approx(2 * asd_1mm[0])  # distances are in mm
    # an organ absent from the fixed label is NaN (left out of the means); one lost by the warp is inf
    only_liver = _cube()
    assert np.isnan(metrics.organ_dice(fixed, only_liver, 3)[1])
    assert np.isnan(metrics.organ_asd(fixed, only_liver, 3, [1, 1, 1])[1])
    assert np.isinf(metrics.organ_asd(only_liver, fixed, 3, [1, 1, 1])[1])


def test_folding_percent():
    assert metrics.folding_percent(torch.zeros(3, 8, 8, 8)) == 0.0
    ddf = torch.zeros(3, 8, 8, 8)
    ddf[0] = -2.0 * torch.arange(8.0)[:, None, None]  # d(x + u)/dx = -1 everywhere: every voxel folds
    assert metrics.folding_percent(ddf) == 100.0


def test_warp_moving_keeps_metadata_and_label_values():
    affine = torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))
    ddf = MetaTensor(torch.zeros(3, 8, 8, 8), affine=affine)
    ddf[0] = 1.0  # one voxel along the first axis
    image = torch.arange(8.0)[:, None, None].expand(8, 8, 8)[None].clone()
    label = (torch.arange(8)[:, None, None].expand(8, 8, 8)[None] % 3).to(torch.uint8)
    out = transforms.WarpMovingd()({"pred": ddf, "moving_raw": image, "moving_label": label})
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
    state = SimpleNamespace(state=SimpleNamespace(device=torch.device("cpu")), network=net, amp=False,
                            optimizer=torch.optim.Adam(net.parameters(), lr=1e-3))
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
    engine.save_state_dict_on_cpu(str(src), str(tmp_path / "sub" / "model_all.pt"))
    state = torch.load(tmp_path / "sub" / "model_all.pt", weights_only=True)
    networks.F3RNet("all", fr_channels=4, ms_channels=8).load_state_dict(state)  # strict
    engine.save_state_dict_on_cpu(str(tmp_path / "absent.pt"))  # nothing trained: no error, nothing written
    assert not (tmp_path / "absent.pt").exists()


def test_markdown_table_layout_and_unknown_variant(tmp_path):
    img = save_nifti(np.zeros((16, 16, 16), np.float32), tmp_path / "a.nii.gz")
    with pytest.raises(checks.BundleInputError, match="unknown F3RNet variant"):
        evaluate.F3RNetEvaluation([], str(tmp_path), {"half": str(img)})
    ev = evaluate.F3RNetEvaluation([], str(tmp_path), {"none": "a.pt", "all": "b.pt"}, direction="mri2ct")
    stat = {"mean": 0.5, "std": 0.1}
    keys = [f"{m}_{g}" for m in ("dice", "asd") for g in ("liver_group", "spleen_group", "kidney_group")]
    entry = {"trained": True, **{k if k.startswith("dice") else f"{k}_mm": stat for k in keys},
             "dice_mean": stat, "folding_percent": stat, "seconds": stat}
    summary = {"device": "cpu", "pairs": ["p1"], "methods": {
        "identity": entry, "none": {**entry, "parameters": 760131}, "all": {"trained": False, "weights": "b.pt"}}}
    table = ev.markdown_table(summary)
    lines = table.splitlines()
    assert lines[0].startswith("MRI-to-CT (moving MR, fixed CT), 1 test pairs")
    assert lines[2].startswith("| Method | ASD Liver (mm) | ASD Spleen (mm) | ASD Kidney (mm) | Dice Liver (%)")
    assert "| F3RNet-w/o F3D | 0.50 ± 0.10 |" in table and "| 50.00 ± 10.00 |" in table and "| 0.760 |" in table
    assert lines[-1] == "| F3RNet-w/ F3D | " + " | ".join(["not trained"] * 10) + " |"
    assert all(line.count("|") == lines[2].count("|") for line in lines[2:])


def test_evaluation_writes_nothing_when_weights_are_broken(tmp_path):
    img = save_nifti(np.zeros((16, 16, 16), np.float32), tmp_path / "a.nii.gz")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"junk")
    item = {"fixed_image": str(img), "moving_image": str(img), "fixed_label": str(img), "moving_label": str(img)}
    ev = evaluate.F3RNetEvaluation([item], str(tmp_path / "eval"), {"none": str(bad)})
    with pytest.raises(checks.BundleInputError, match=f"{bad}: not a loadable"):
        ev.run()
    assert not (tmp_path / "eval").exists()
    assert nib.load(str(img)).shape == (16, 16, 16)


def test_evaluation_warms_up_each_network_once_before_timing(tmp_path, monkeypatch):
    image = save_nifti(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32), tmp_path / "a.nii.gz")
    label = save_nifti((np.arange(16)[:, None, None] > 7).repeat(16, 1).repeat(16, 2).astype(np.uint8),
                       tmp_path / "l.nii.gz")
    item = {"fixed_image": str(image), "moving_image": str(image), "fixed_label": str(label),
            "moving_label": str(label)}
    weights = {}
    for variant in ("none", "all"):
        weights[variant] = str(tmp_path / f"{variant}.pt")
        torch.save(networks.F3RNet(f3d=variant, fr_channels=2, ms_channels=4).state_dict(), weights[variant])
    calls = []
    forward = networks.F3RNet.forward
    monkeypatch.setattr(networks.F3RNet, "forward", lambda self, x: (calls.append(self.f3d), forward(self, x))[1])
    evaluate.F3RNetEvaluation([item, {**item, "name": "second"}], str(tmp_path / "eval"), weights,
                              fr_channels=2, ms_channels=4).run()
    # first pair: warm-up + timed call per network; second pair: timed call only
    assert calls == ["none", "none", "all", "all", "none", "all"]
