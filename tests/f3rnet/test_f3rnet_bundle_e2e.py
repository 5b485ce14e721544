"""Every f3rnet_ct_mri config end to end through MONAI's bundle runner on tiny abdominal phantoms, on CPU.

The phantoms come from tools/make_abdomen_phantoms.py at 36x40x32 (not a multiple of 16, so the network's
pad-then-crop path is exercised everywhere); the network is F3RNet's topology with 4/8 channels.
Train, inference, evaluate (train.json overridden by evaluate.json), DDP and one bad input run as
`python -m monai.bundle run` subprocesses (tests.helpers.run_bundle); the remaining bad inputs (and two of the
evaluated methods) run the same configs through `monai.bundle.run` in-process, which is the function the CLI
calls (a subprocess costs ~10 s of imports on 2 cores).
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from tests.f3rnet.bundle_import import BUNDLE_ROOT, load_f3rnet
from tests.helpers import assert_disjoint_shards_and_rank0_checkpoints, ddp_probes, rank1_files, run_bundle, save_nifti
from tools import make_abdomen_phantoms

SHAPE = (36, 40, 32)
TINY_NET = {"fr_channels": 4, "ms_channels": 8}
TINY_TRAIN = {**TINY_NET, "max_iterations": 2, "val_interval": 1, "train_roi_size": [32, 24, 32]}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", *map(str, SHAPE)])
    return root  # training case000, case001; validation case002; test case003


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("f3rnet_train")
    result = run_bundle(
        "f3rnet_ct_mri",
        ["train.json"],
        {**TINY_TRAIN, "dataset_dir": str(phantoms), "ckpt_dir": str(out / "models"), "log_dir": str(out / "logs")},
    )
    return out, result


def tiny_network(variant: str = "none"):
    return load_f3rnet("networks").F3RNet(f3d=variant, **TINY_NET)


def test_train_saves_plain_cpu_state_dicts_and_logs(trained):
    out, result = trained
    log = result.stdout + result.stderr
    assert "val_mean_dice" in log and "Got new best metric of val_mean_dice" in log
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    expected = tiny_network().state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.device.type == "cpu" for v in state.values())
    assert (out / "models" / "checkpoint_final.pt").is_file()  # full state for --resume_from
    assert any((out / "logs").glob("events.out.tfevents*"))
    # the optimiser moved the weights away from their initial values
    assert any(not torch.equal(state[k], v) for k, v in expected.items() if k.startswith("flow"))


def test_inference_writes_ddf_warped_image_and_label_on_the_input_grid(trained, phantoms, tmp_path):
    out, _ = trained
    result = run_bundle(
        "f3rnet_ct_mri",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(phantoms),
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path),
        },
    )
    case = tmp_path / "case003"  # the test pair (its datalist name), ct2mri: moving CT
    moving = nib.load(str(phantoms / "ct" / "case003_ct.nii.gz"))
    outputs = {p: nib.load(str(case / f"case003_{p}.nii.gz")) for p in ("ddf", "warped", "warped_label")}
    for postfix, img in outputs.items():
        assert img.shape[:3] == SHAPE, postfix
        assert np.allclose(img.affine, moving.affine, atol=1e-5), postfix
        assert img.header.get_zooms()[:3] == (1.0, 1.0, 1.0), postfix
    ddf = np.asarray(outputs["ddf"].dataobj, np.float32)
    assert ddf.shape == (*SHAPE, 3) and np.isfinite(ddf).all()
    # the warped image is the raw moving CT (HU) resampled with the saved DDF
    warped = np.asarray(outputs["warped"].dataobj, np.float32)
    ct = torch.as_tensor(np.asarray(moving.dataobj, np.float32))[None, None]
    expected = Warp(mode="bilinear", padding_mode="border")(ct, torch.as_tensor(np.moveaxis(ddf, -1, 0))[None])
    np.testing.assert_allclose(warped, expected[0, 0].numpy(), atol=1e-2)
    assert warped.min() < -500 and warped.max() > 100  # HU, not the normalised network input
    label = np.asarray(outputs["warped_label"].dataobj)
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1, 2, 3, 4}
    # ... and the warped label is the moving label resampled (nearest) with the same saved DDF
    moving_label = np.asarray(nib.load(str(phantoms / "labels" / "case003_ct_label.nii.gz")).dataobj, np.float32)
    expected_label = Warp(mode="nearest", padding_mode="zeros")(
        torch.as_tensor(moving_label)[None, None], torch.as_tensor(np.moveaxis(ddf, -1, 0))[None]
    )
    np.testing.assert_array_equal(label, expected_label[0, 0].numpy().round().astype(np.uint8))
    assert not list(tmp_path.rglob(".partial-*"))
    # instance optimisation is on by default: one progress bar, and its time in the case's line
    assert "IO 1/" in result.stderr and "IO " in result.stdout and "network " in result.stdout


def test_direction_mri2ct_runs_the_shipped_mri2ct_weights(phantoms, tmp_path):
    """--direction mri2ct with the default ckpt_path loads the shipped models/model_mri2ct.pt (moving MR onto the
    fixed CT), not the CT->MRI weights: the network's DDF differs from the one the CT->MRI file gives."""
    assert (BUNDLE_ROOT / "models" / "model_mri2ct.pt").is_file()
    ddfs = {}
    for name, ckpt in (("mri2ct", None), ("ct2mri_weights", BUNDLE_ROOT / "models" / "model.pt")):
        overrides = {
            "dataset_dir": str(phantoms),
            "direction": "mri2ct",
            "io_iterations": 0,
            "output_dir": str(tmp_path / name),
        }
        if ckpt is not None:
            overrides["ckpt_path"] = str(ckpt)
        run_bundle("f3rnet_ct_mri", ["inference.json"], overrides)
        case = tmp_path / name / "case003"
        ddfs[name] = np.asarray(nib.load(str(case / "case003_ddf.nii.gz")).dataobj, np.float32)
        warped = nib.load(str(case / "case003_warped.nii.gz"))
        assert np.asarray(warped.dataobj).min() > -1  # the MR (raw, non-negative), not CT in HU (air -1000), moves
    assert np.abs(ddfs["mri2ct"]).max() > 0.01
    assert not np.allclose(ddfs["mri2ct"], ddfs["ct2mri_weights"], atol=1e-3)


def test_io_iterations_0_gives_exactly_the_network_field_and_io_refines_it(trained, phantoms, tmp_path):
    """`--io_iterations 0` saves the field of the engine without instance optimisation (`io` None), bit for bit;
    the default (IO on) saves another field, which moves the warped moving CT closer to the fixed MR in MIND-SSC
    terms (the similarity IO optimises)."""
    out, _ = trained
    common = {**TINY_NET, "dataset_dir": str(phantoms), "ckpt_path": str(out / "models" / "model.pt")}
    fields = {}
    for name, overrides in {
        "io_0": {"io_iterations": 0},
        "no_io": {"evaluator#iteration_update#io": "$None"},
        "io": {},
    }.items():
        _run_in_process("inference.json", output_dir=str(tmp_path / name), **common, **overrides)
        fields[name] = np.asarray(nib.load(str(tmp_path / name / "case003" / "case003_ddf.nii.gz")).dataobj)
    np.testing.assert_array_equal(fields["io_0"], fields["no_io"])
    assert np.abs(fields["io"] - fields["no_io"]).max() > 0.05


EVALUATE = ["train.json", "evaluate.json"]  # evaluate.json overrides train.json
ORGANS = ("liver", "spleen", "kidney_right", "kidney_left")  # label ids 1-4; right/left: the patient's
EVAL_METRICS = [
    "dice",
    *[f"dice_{o}" for o in ORGANS],
    "asd",
    *[f"asd_{o}" for o in ORGANS],
    "hd95",
    *[f"hd95_{o}" for o in ORGANS],
    "folding_percent",
    "sdlogj",
    "seconds",
]


def _eval_metrics(folder) -> dict[str, float]:
    return {row[0]: float(row[1]) for row in csv.reader((folder / "metrics.csv").read_text().splitlines())}


def test_evaluate_reports_each_method_and_not_trained(trained, phantoms, tmp_path):
    """One method per run (--method): the shipped variant on the command line, identity and a second variant
    in-process; a method without its weights file fails with "weights file not found" (the card's "not trained")."""
    out, _ = trained
    common = {**TINY_NET, "dataset_dir": str(phantoms), "ckpt_dir": str(out / "models")}
    result = run_bundle(
        "f3rnet_ct_mri", EVALUATE, {**common, "method": "none", "output_dir": str(tmp_path / "none"), "warmup": "False"}
    )
    none = _eval_metrics(tmp_path / "none")
    assert list(none) == EVAL_METRICS
    for name in EVAL_METRICS:
        raw = list(csv.DictReader((tmp_path / "none" / f"{name}_raw.csv").read_text().splitlines()))
        assert [r["filename"] for r in raw] == ["case003"], name  # per pair, named by the datalist item
        assert (tmp_path / "none" / f"{name}_summary.csv").is_file()
    organs = list(csv.DictReader((tmp_path / "none" / "dice_raw.csv").read_text().splitlines()))[0]
    assert [k for k in organs if k.startswith("class")] == ["class0", "class1", "class2", "class3"]  # 4 organs
    assert 0 <= none["dice"] <= 1 and 0 <= none["asd"] < 20 and none["hd95"] >= 0 and none["seconds"] > 0
    assert (tmp_path / "none" / "registration_none_ct2mri.png").stat().st_size > 10_000
    assert "[1/1]" in result.stderr and "100%" in result.stderr  # progress bar

    _run_in_process(EVALUATE, **common, method="identity", output_dir=str(tmp_path / "identity"))
    identity = _eval_metrics(tmp_path / "identity")
    assert list(identity) == EVAL_METRICS
    assert identity["folding_percent"] == 0 and identity["sdlogj"] == 0
    assert identity["dice_liver"] < 0.95  # the phantom deforms the liver most
    assert (tmp_path / "identity" / "registration_identity_ct2mri.png").is_file()

    # the network variant follows the method: variant-"all" weights load into F3RNet-w/ F3D
    all_weights = tmp_path / "model_all.pt"
    torch.save(tiny_network("all").state_dict(), all_weights)
    _run_in_process(
        EVALUATE, **common, method="all", output_dir=str(tmp_path / "all"), **{"method_weights#all": str(all_weights)}
    )
    assert list(_eval_metrics(tmp_path / "all")) == EVAL_METRICS

    _expect_failure(
        EVALUATE,
        [f"{out / 'models' / 'model_all.pt'}: weights file not found"],
        tmp_path / "missing",
        **common,
        method="all",
    )
    _expect_failure(
        EVALUATE,
        ["method must be one of identity, none, all", "got 'ncc'"],
        tmp_path / "unknown",
        **common,
        method="ncc",
    )


def test_multi_gpu_train_two_gloo_processes_resumes_and_exports(trained, phantoms, tmp_path):
    """DDP on CPU (gloo); also the one-override resume (from the single-process run's final checkpoint, at
    iteration 2 of 4) and `model_export_path`."""
    out, _ = trained
    result = run_bundle(
        "f3rnet_ct_mri",
        ["train.json", "multi_gpu_train.json"],
        {
            **TINY_TRAIN,
            "max_iterations": 4,
            "dataset_dir": str(phantoms),
            "ckpt_dir": str(tmp_path / "models"),
            "log_dir": str(tmp_path / "logs"),
            "resume_from": str(out / "models" / "checkpoint_final.pt"),
            "model_export_path": str(tmp_path / "exported" / "model_dist.pt"),
        },
        torchrun_nproc=2,
    )
    log = result.stdout + result.stderr
    assert f"Restored all variables from {out / 'models' / 'checkpoint_final.pt'}" in log
    assert "SupervisedTrainer - INFO - Epoch[3] Complete" in log and "Train completed" in log
    assert "SupervisedTrainer - INFO - Epoch[1] Complete" not in log  # resumed at epoch 2 of 4
    state = torch.load(tmp_path / "exported" / "model_dist.pt", map_location="cpu", weights_only=True)
    assert set(state) == set(tiny_network().state_dict())  # no DDP "module." prefix
    assert any((tmp_path / "logs").glob("events.out.tfevents*"))


def test_multi_gpu_ranks_see_disjoint_shards_and_only_rank0_writes(phantoms, tmp_path):
    run_bundle(
        "f3rnet_ct_mri",
        ["train.json", "multi_gpu_train.json"],
        {**TINY_TRAIN, "dataset_dir": str(phantoms), **ddp_probes(tmp_path)},
        torchrun_nproc=2,
    )
    training = json.loads((phantoms / "datalist_ct2mri.json").read_text())["training"]
    assert_disjoint_shards_and_rank0_checkpoints(tmp_path, {item["name"] for item in training})
    assert rank1_files(tmp_path) == []


def test_bad_weights_give_one_clear_error_on_the_command_line(trained, phantoms, tmp_path):
    out, _ = trained
    result = run_bundle(
        "f3rnet_ct_mri",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(phantoms),
            "variant": "all",
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert "weights do not match the configured network F3RNet" in result.stderr
    assert "F3RNet variant 'all'" in result.stderr
    assert str(out / "models" / "model.pt") in result.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# bad inputs, in-process through monai.bundle.run (the function behind `python -m monai.bundle run`)


def _run_in_process(config: str | list[str], **overrides):
    """`config`: one config file name, or a list merged in order (e.g. train.json then evaluate.json)."""
    from monai.bundle import run

    load_f3rnet("checks")  # this bundle's `scripts` package first on sys.path, other bundles' purged
    files = [str(BUNDLE_ROOT / "configs" / c) for c in ([config] if isinstance(config, str) else config)]
    return run(
        config_file=files[0] if len(files) == 1 else files,
        bundle_root=str(BUNDLE_ROOT),
        logging_file=False,
        **overrides,
    )


def _messages(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def _expect_failure(config: str | list[str], expected: list[str], output_dir, **overrides) -> None:
    with pytest.raises(Exception) as err:
        _run_in_process(config, output_dir=str(output_dir), **overrides)
    text = _messages(err.value)
    for fragment in expected:
        assert fragment in text, (fragment, text[-2000:])
    assert not output_dir.exists() or not [p for p in output_dir.rglob("*") if p.is_file()]


def _bad_moving(tmp_path, phantoms, problem: str):
    fixed = phantoms / "mr" / "case003_mr.nii.gz"
    data = np.asarray(nib.load(str(fixed)).dataobj, np.float32)
    moving = tmp_path / f"moving_{problem}.nii.gz"
    origin = (-(SHAPE[0] - 1) / 2, -(SHAPE[1] - 1) / 2, -(SHAPE[2] - 1) / 2)  # the phantoms' grid
    if problem == "missing":
        return fixed, moving, "file not found"
    if problem == "nan":
        data = data.copy()
        data[3, 4, 5] = np.nan
        save_nifti(data, moving, origin=origin)
        return fixed, moving, "contains NaN or infinite values (1 voxels)"
    if problem == "not3d":
        nib.save(nib.Nifti1Image(data[:, :, 0], np.eye(4)), str(moving))
        return fixed, moving, "expected a 3D volume"
    if problem == "too_small":
        save_nifti(data[:, :, :8], moving, origin=origin)
        return fixed, moving, "smaller than the minimum (16, 16, 16)"
    if problem == "mismatched":
        save_nifti(data[:, :, :30], moving, origin=origin)
        return fixed, moving, "does not match the fixed image"
    if problem == "shifted_grid":
        save_nifti(data, moving, origin=(0.0, 0.0, 0.0))
        return fixed, moving, "does not match the fixed image"
    raise ValueError(problem)


@pytest.mark.parametrize("problem", ["missing", "nan", "not3d", "too_small", "mismatched", "shifted_grid"])
def test_inference_rejects_bad_pairs_before_writing(trained, phantoms, tmp_path, problem):
    out, _ = trained
    fixed, moving, expected = _bad_moving(tmp_path, phantoms, problem)
    _expect_failure(
        "inference.json",
        [expected, str(moving)],
        tmp_path / "out",
        **TINY_NET,
        moving_image=str(moving),
        fixed_image=str(fixed),
        ckpt_path=str(out / "models" / "model.pt"),
    )


def test_inference_rejects_missing_and_foreign_weights(phantoms, tmp_path):
    missing = tmp_path / "nothing.pt"
    _expect_failure(
        "inference.json",
        [f"{missing}: weights file not found"],
        tmp_path / "out",
        **TINY_NET,
        dataset_dir=str(phantoms),
        ckpt_path=str(missing),
    )
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, foreign)
    _expect_failure(
        "inference.json",
        [f"{foreign}: weights do not match", "1 unexpected"],
        tmp_path / "out",
        **TINY_NET,
        dataset_dir=str(phantoms),
        ckpt_path=str(foreign),
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    _expect_failure(
        "inference.json",
        [f"{garbage}: not a loadable PyTorch state dict"],
        tmp_path / "out",
        **TINY_NET,
        dataset_dir=str(phantoms),
        ckpt_path=str(garbage),
    )


def test_direction_must_match_the_datalist_and_be_valid(trained, phantoms, tmp_path):
    out, _ = trained
    datalist = phantoms / "datalist_ct2mri.json"
    _expect_failure(
        "inference.json",
        [f"datalist {datalist} is for direction 'ct2mri' but the bundle runs 'mri2ct'"],
        tmp_path / "out",
        **TINY_NET,
        dataset_dir=str(phantoms),
        datalist=str(datalist),
        direction="mri2ct",
        ckpt_path=str(out / "models" / "model.pt"),
    )
    _expect_failure(
        "train.json",
        ["direction must be one of ct2mri, mri2ct, got 'ct2mr'"],
        tmp_path / "out",
        **TINY_TRAIN,
        dataset_dir=str(phantoms),
        datalist=str(datalist),
        direction="ct2mr",
        ckpt_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "out" / "logs"),
    )


def test_train_rejects_a_missing_datalist_and_unlabelled_validation(phantoms, tmp_path):
    _expect_failure(
        "train.json",
        ["datalist not found", "make_abdomen_phantoms"],
        tmp_path / "out",
        **TINY_TRAIN,
        dataset_dir=str(tmp_path / "nowhere"),
        ckpt_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "out" / "logs"),
    )
    datalist = json.loads((phantoms / "datalist_ct2mri.json").read_text())
    for item in datalist["validation"]:
        del item["fixed_label"]
    (tmp_path / "dl.json").write_text(json.dumps(datalist))
    _expect_failure(
        "train.json",
        ["has no 'fixed_label' (needed for Dice)"],
        tmp_path / "out",
        **TINY_TRAIN,
        dataset_dir=str(phantoms),
        datalist=str(tmp_path / "dl.json"),
        ckpt_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "out" / "logs"),
    )


def test_evaluate_rejects_weights_of_another_variant_and_broken_weights_before_writing(trained, phantoms, tmp_path):
    out, _ = trained
    model = out / "models" / "model.pt"  # weights of variant none
    _expect_failure(
        EVALUATE,
        [f"{model}: weights do not match the configured network F3RNet", "F3RNet variant 'all'"],
        tmp_path / "eval",
        **TINY_NET,
        dataset_dir=str(phantoms),
        method="all",
        **{"method_weights#all": str(model)},
    )
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"junk")
    _expect_failure(
        EVALUATE,
        [f"{broken}: not a loadable PyTorch state dict"],
        tmp_path / "eval",
        **TINY_NET,
        dataset_dir=str(phantoms),
        method="none",
        **{"method_weights#none": str(broken)},
    )
