"""Every refdrn config end to end through MONAI's bundle runner on tiny synthetic pairs, on CPU,
with the real frozen REM of the rem_sr bundle."""

import hashlib
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from tests.helpers import (
    BUNDLES,
    assert_disjoint_shards_and_rank0_checkpoints,
    ddp_probes,
    make_pair_dataset,
    rank1_files,
    run_bundle,
    save_nifti,
)

TINY_NET = {"fdrn_channels": [4, 8, 8], "fdrn_num_res": 1}
TINY_TRAIN = {
    **TINY_NET,
    "max_iterations": 4,
    "val_interval": 2,
    "train_roi_size": [24, 24, 24],
    "sr_max_window_voxels": 48**3,
    "lncc_kernel_size": 5,
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = make_pair_dataset(tmp_path_factory.mktemp("pairs"))
    # an LR x4 test pair (4 mm voxels, area-aligned affine) with the moving label on the HR grid
    item = {}
    for role, sub in (("moving_image", 3), ("fixed_image", 2)):
        img = nib.load(str(root / f"sub{sub}_T1w.nii.gz"))
        hr = np.asarray(img.dataobj, np.float32)
        lr = hr.reshape(hr.shape[0] // 4, 4, hr.shape[1] // 4, 4, hr.shape[2] // 4, 4).mean((1, 3, 5))
        to_hr = np.diag([4.0, 4.0, 4.0, 1.0])
        to_hr[:3, 3] = 1.5
        nib.save(nib.Nifti1Image(lr, img.affine @ to_hr), str(root / f"lr4_sub{sub}.nii.gz"))
        item[role] = f"lr4_sub{sub}.nii.gz"
    item["moving_label"] = "sub3_labels.nii.gz"
    (root / "datalist_lr_x4.json").write_text(json.dumps({"test": [item]}))
    return root


@pytest.fixture(scope="module")
def trained(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("refdrn_train")
    rem_weights = BUNDLES / "rem_sr" / "models" / "model.pt"
    before = hashlib.sha256(rem_weights.read_bytes()).hexdigest()
    result = run_bundle(
        "refdrn",
        ["train.json"],
        {
            **TINY_TRAIN,
            "dataset_dir": str(pairs),
            "datalist": str(pairs / "datalist.json"),
            "ckpt_dir": str(out / "models"),
            "log_dir": str(out / "logs"),
            # REM's output cached on disk (PersistentDataset), the budget of a time-limited comparison run
            "train_cache_dir": str(out / "cache"),
            "time_limit_s": 600,
        },
    )
    result.rem_sha256 = (before, hashlib.sha256(rem_weights.read_bytes()).hexdigest())
    return out, result


def test_train_saves_backbone_only_and_logs(trained):
    out, result = trained
    assert "val_dice" in result.stdout + result.stderr
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(k.startswith("backbone.") for k in state)  # rem_sr's weights are never copied
    assert all(v.device.type == "cpu" for v in state.values())
    assert any((out / "logs").glob("events.out.tfevents*"))


def test_train_cache_dir_holds_the_preprocessed_pairs(trained):
    out, result = trained
    (folder,) = (out / "cache").iterdir()  # one folder per scale and REM (scripts.data.cache_key)
    assert len(list(folder.glob("*.pt"))) == 2  # the two training pairs of the tiny datalist
    assert "caching the training pairs" in result.stderr


def test_rem_sr_weights_file_is_untouched_by_cascade_training(trained):
    """The cascade reads rem_sr's weights in place and never writes them (the in-memory freezing and the
    gradient flow through REM are unit-tested in test_refdrn_cascade.py)."""
    _, result = trained
    before, after = result.rem_sha256
    assert before == after


def test_inference_writes_all_outputs_on_the_hr_grid(trained, pairs, tmp_path):
    out, _ = trained
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(pairs),
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path),
        },
    )
    case = tmp_path / "lr4_sub3"
    hr = nib.load(str(pairs / "sub3_T1w.nii.gz"))
    for postfix in ("sr_fixed", "sr_moving", "warped", "ddf", "warped_label"):
        img = nib.load(str(case / f"lr4_sub3_{postfix}.nii.gz"))
        assert img.shape[:3] == hr.shape, postfix
        assert np.allclose(img.affine, hr.affine, atol=1e-4), postfix
    assert nib.load(str(case / "lr4_sub3_ddf.nii.gz")).shape[-1] == 3
    label = np.asarray(nib.load(str(case / "lr4_sub3_warped_label.nii.gz")).dataobj)
    assert set(np.unique(label)) <= {0, 1, 2, 3, 4}
    assert not list(tmp_path.rglob(".partial-*"))
    # the saved DDF is the final one (IO is on by default): re-warping the saved SR moving image and the moving
    # label with it gives the saved warped image and warped label
    ddf = torch.as_tensor(np.moveaxis(np.asarray(nib.load(str(case / "lr4_sub3_ddf.nii.gz")).dataobj), -1, 0))[None]
    sr_moving = torch.as_tensor(np.asarray(nib.load(str(case / "lr4_sub3_sr_moving.nii.gz")).dataobj, np.float32))
    warped = np.asarray(nib.load(str(case / "lr4_sub3_warped.nii.gz")).dataobj, np.float32)
    rewarped = Warp(mode="bilinear", padding_mode="border")(sr_moving[None, None], ddf.float())[0, 0].numpy()
    np.testing.assert_allclose(warped, rewarped, atol=1e-3 * float(np.abs(warped).max()))
    moving_label = np.asarray(nib.load(str(pairs / "sub3_labels.nii.gz")).dataobj, np.float32)
    relabel = Warp(mode="nearest", padding_mode="zeros")(torch.as_tensor(moving_label)[None, None], ddf.float())
    np.testing.assert_array_equal(label, relabel[0, 0].numpy().round().astype(label.dtype))
    assert "IO 1/" in result.stderr and "IO " in result.stdout  # the progress bar and IO's time in the case line


def test_io_iterations_0_gives_exactly_the_network_field(trained, pairs, tmp_path):
    """`--io_iterations 0` saves the field of the engine without instance optimisation (`io` None), bit for bit;
    the default's field (IO on) differs from it."""
    out, _ = trained
    common = {**TINY_NET, "dataset_dir": str(pairs), "ckpt_path": str(out / "models" / "model.pt")}
    fields = {}
    for name, overrides in {
        "io_0": {"io_iterations": 0},
        "no_io": {"evaluator#iteration_update#io": "$None"},
        "io": {},
    }.items():
        run_bundle("refdrn", ["inference.json"], {**common, **overrides, "output_dir": str(tmp_path / name)})
        fields[name] = np.asarray(nib.load(str(tmp_path / name / "lr4_sub3" / "lr4_sub3_ddf.nii.gz")).dataobj)
    np.testing.assert_array_equal(fields["io_0"], fields["no_io"])
    assert np.abs(fields["io"] - fields["no_io"]).max() > 0.05


# the evaluation (evaluate.json) is tested in test_refdrn_evaluate_e2e.py


@pytest.fixture(scope="module")
def ddp_run(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("refdrn_ddp")
    run_bundle(
        "refdrn",
        ["train.json", "multi_gpu_train.json"],
        {**TINY_TRAIN, "dataset_dir": str(pairs), "datalist": str(pairs / "datalist.json"), **ddp_probes(out)},
        torchrun_nproc=2,
    )
    return out


def test_multi_gpu_train_with_two_gloo_processes(ddp_run, pairs):
    state = torch.load(ddp_run / "models_rank0" / "model.pt", map_location="cpu", weights_only=True)
    assert state and all(k.startswith("backbone.") for k in state)
    training = json.loads((pairs / "datalist.json").read_text())["training"]
    assert_disjoint_shards_and_rank0_checkpoints(ddp_run, {item["name"] for item in training})


def test_multi_gpu_rank1_writes_no_files(ddp_run):
    assert rank1_files(ddp_run) == []


def _bad_pair(tmp_path, pairs, problem):
    fixed = str(pairs / "sub2_T1w.nii.gz")
    moving = tmp_path / "moving.nii.gz"
    if problem == "missing":
        expected = "file not found"
    elif problem == "nan":
        data = np.asarray(nib.load(fixed).dataobj, np.float32).copy()
        data[1, 1, 1] = np.nan
        save_nifti(data, moving)
        expected = "NaN"
    elif problem == "not3d":
        nib.save(nib.Nifti1Image(np.ones((32, 40), np.float32), np.eye(4)), str(moving))
        expected = "expected a 3D volume"
    else:  # mismatched grids
        save_nifti(np.ones((30, 40, 32), np.float32), moving)
        expected = "does not match the fixed image"
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"fixed_image": fixed, "moving_image": str(moving)}]}))
    return expected, moving


@pytest.mark.parametrize("problem", ["missing", "nan", "not3d", "mismatched"])
def test_inference_rejects_bad_pairs_without_writing(trained, pairs, tmp_path, problem):
    out, _ = trained
    expected, moving = _bad_pair(tmp_path, pairs, problem)
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        {
            **TINY_NET,
            "datalist": str(tmp_path / "dl.json"),
            "dataset_dir": str(tmp_path),
            "scale": 1,
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert expected in result.stderr and str(moving) in result.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_missing_rem_weights_give_one_clear_error(trained, pairs, tmp_path):
    out, _ = trained
    fake_rem = tmp_path / "rem_sr"
    shutil.copytree(BUNDLES / "rem_sr" / "configs", fake_rem / "configs")
    shutil.copytree(BUNDLES / "rem_sr" / "scripts", fake_rem / "scripts")
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(pairs),
            "rem_bundle": str(fake_rem),
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert "rem_sr weights not found" in result.stderr and str(fake_rem / "models" / "model.pt") in result.stderr
    # weights of another REM architecture
    (fake_rem / "models").mkdir()
    torch.save({"head.weight": torch.zeros(1)}, fake_rem / "models" / "model.pt")
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(pairs),
            "rem_bundle": str(fake_rem),
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
        },
        check=False,
    )
    assert result.returncode != 0 and "incompatible with the architecture" in result.stderr


@pytest.mark.parametrize("flag", [False, "false", "False", "0"])
def test_use_rem_false_from_the_command_line_disables_rem(flag):
    from tests.helpers import load_bundle_scripts

    rem_loader = load_bundle_scripts("refdrn", "rem_loader")
    assert rem_loader.load_rem(str(BUNDLES / "rem_sr"), enabled=flag) is None
    assert rem_loader.load_rem(str(BUNDLES / "rem_sr"), enabled="true") is not None
