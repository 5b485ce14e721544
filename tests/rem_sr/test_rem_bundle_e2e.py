"""Every rem_sr config end to end through MONAI's bundle runner, on tiny volumes and on nibabel's
anatomical.nii, on CPU."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import (
    ddp_probes,
    load_bundle_scripts,
    rank1_files,
    run_bundle,
    save_nifti,
)

TINY_TRAIN = {
    "patch_size": [16, 16, 16],
    "crop_margin": 4,  # nibabel's anatomical.nii is 25 voxels along z: 16 + 2 * 4 fits
    "batch_size": 2,
    "max_iterations": 4,
    "val_interval": 2,
    "val_max_window_voxels": 24**3,
    "num_workers": 0,
    "rem_k": 4,
    "rem_n": 2,
}
TINY_NET = {"rem_k": 4, "rem_n": 2}


@pytest.fixture(scope="module")
def trained(brain_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rem_train")
    result = run_bundle(
        "rem_sr",
        ["train.json"],
        {
            **TINY_TRAIN,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist.json"),
            "ckpt_dir": str(out / "models"),
            "log_dir": str(out / "logs"),
        },
    )
    return out, result


def test_train_writes_cpu_state_dict_and_logs(trained):
    out, result = trained
    assert "val_psnr" in result.stdout + result.stderr
    # the training items (3 images + 1 label map) and the validation volume at each of val_degradations (x2, x4,
    # 1x1x4 thick slices) are cached: CacheDataset's loading bars
    assert "| 4/4 [" in result.stderr and "| 3/3 [" in result.stderr
    state = torch.load(out / "models" / "model.pt", map_location="cpu", weights_only=True)
    assert all(v.device.type == "cpu" for v in state.values())
    networks = load_bundle_scripts("rem_sr", "networks")
    networks.REM(k=4, n=2).load_state_dict(state, strict=True)
    assert (out / "models" / "checkpoint_final.pt").exists()
    assert any((out / "logs").glob("events.out.tfevents*"))


def test_train_resumes_from_checkpoint(trained, brain_data):
    out, _ = trained
    result = run_bundle(
        "rem_sr",
        ["train.json"],
        {
            **TINY_TRAIN,
            "max_iterations": 6,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist.json"),
            "ckpt_dir": str(out / "models"),
            "log_dir": str(out / "logs"),
            "resume_from": str(out / "models" / "checkpoint_final.pt"),
        },
    )
    log = result.stdout + result.stderr
    assert "Restored all variables" in log, log[-3000:]
    # iterations 1-4 came from the checkpoint: only epoch 3 (iterations 5-6) runs
    assert "Epoch: 3/3, Iter: 1/2" in log and "Epoch: 1/3" not in log, log[-3000:]


def test_inference_writes_lr_sr_hr_on_the_reference_grid(trained, brain_data, tmp_path):
    out, _ = trained
    run_bundle(
        "rem_sr",
        ["inference.json"],
        {
            **TINY_NET,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist_lr_x2.json"),
            "scale": 2,
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path),
            "roi_size": [24, 24, 24],
        },
    )
    case = tmp_path / "lr_syn3_T1w"
    sr = nib.load(str(case / "lr_syn3_T1w_sr.nii.gz"))
    hr = nib.load(str(brain_data / "syn3_T1w.nii.gz"))
    assert sr.shape == hr.shape
    assert np.allclose(sr.affine, hr.affine, atol=1e-4)
    assert (case / "lr_syn3_T1w_lr.nii.gz").exists() and (case / "lr_syn3_T1w_hr.nii.gz").exists()
    assert not list(tmp_path.rglob(".partial-*"))
    anat_sr = nib.load(str(tmp_path / "lr_anatomical_T1w" / "lr_anatomical_T1w_sr.nii.gz"))
    assert anat_sr.shape == (32, 40, 24) and np.isfinite(anat_sr.get_fdata()).all()


def test_inference_on_users_own_file_with_target_spacing(trained, tmp_path):
    """A user's LR file (nibabel's 2 mm anatomical.nii, raw int16 units) upsampled to 1 mm."""
    out, _ = trained
    from tests.helpers import ANATOMICAL

    datalist = tmp_path / "mine.json"
    datalist.write_text(json.dumps({"test": [{"image": str(ANATOMICAL)}]}))
    run_bundle(
        "rem_sr",
        ["inference.json"],
        {
            **TINY_NET,
            "datalist": str(datalist),
            "dataset_dir": str(tmp_path),
            "target_spacing": 1.0,
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
            "roi_size": [32, 32, 32],
        },
    )
    sr = nib.load(str(tmp_path / "out" / "anatomical" / "anatomical_sr.nii.gz"))
    src = nib.load(str(ANATOMICAL))
    assert sr.shape == tuple(2 * s for s in src.shape)
    assert np.allclose(sr.header.get_zooms()[:3], 1.0)
    # the intensities stay in the input's units (not the network's [0, 1])
    assert sr.get_fdata().max() > 10 * 1.0


EVAL_CONFIGS = ["train.json", "evaluate.json"]
EVAL_METRICS = {"psnr_brain", "ssim_brain", "psnr", "ssim", "seconds"}


def evaluate_overrides(brain_data, output_dir, **extra) -> dict:
    return {
        **TINY_NET,
        "dataset_dir": str(brain_data),
        "datalist": str(brain_data / "datalist.json"),
        "output_dir": str(output_dir),
        "val_max_window_voxels": 24**3,
        **extra,
    }


def per_case(output_dir, metric: str) -> dict[str, float]:
    """MetricsSaver's `<metric>_raw.csv`: case name -> value."""
    return {r["filename"]: float(r["class0"]) for r in csv.DictReader(open(output_dir / f"{metric}_raw.csv"))}


def test_evaluate_rem_writes_metrics_per_case_summaries_and_figure(trained, brain_data, tmp_path):
    out, _ = trained
    result = run_bundle(
        "rem_sr",
        EVAL_CONFIGS,
        evaluate_overrides(brain_data, tmp_path, method="rem", ckpt_path=str(out / "models" / "model.pt")),
    )
    aggregated = dict(line.split(",") for line in (tmp_path / "metrics.csv").read_text().split())
    assert set(aggregated) == EVAL_METRICS  # every metric, aggregated over the cases
    for metric in EVAL_METRICS:
        values = per_case(tmp_path, metric)
        assert set(values) == {"syn3", "anatomical"}  # one row per test case, named by the datalist
        summary = list(csv.DictReader(open(tmp_path / f"{metric}_summary.csv")))
        assert {"mean", "median", "std", "notnans"} <= set(summary[0])
    # the synthetic case has a brain mask, nibabel's anatomical.nii has none: NaN, left out of the mean
    brain = per_case(tmp_path, "psnr_brain")
    assert np.isfinite(brain["syn3"]) and np.isnan(brain["anatomical"])
    assert float(aggregated["psnr_brain"]) == pytest.approx(brain["syn3"], abs=1e-4)
    assert all(v > 0 for v in per_case(tmp_path, "seconds").values())
    assert (tmp_path / "sr_rem_x4.png").stat().st_size > 10_000
    assert not list(tmp_path.glob(".partial-*"))
    log = result.stdout + result.stderr
    assert "psnr_brain" in log and "/2]" in log  # StatsHandler's metrics and the progress bar ("[1/2]" ...)


def test_evaluate_baseline_scores_the_clipped_interpolation_by_hand(brain_data, tmp_path):
    """A weight-free method (B-spline at x2) runs without weights and scores exactly what its definition says."""
    run_bundle("rem_sr", EVAL_CONFIGS, evaluate_overrides(brain_data, tmp_path, method="bspline", eval_scale=2))
    degradation = load_bundle_scripts("rem_sr", "degradation")
    hr = torch.from_numpy(nib.load(str(brain_data / "syn3_T1w.nii.gz")).get_fdata(dtype=np.float32))[None]
    mask = nib.load(str(brain_data / "syn3_mask.nii.gz")).get_fdata() > 0
    pred = degradation.degrade(hr, 2, "bspline").clamp(0, 1)[0].double().numpy()
    ref = hr[0].double().numpy()
    psnr = 10 * np.log10(1 / np.mean((pred - ref) ** 2))
    psnr_brain = 10 * np.log10(1 / np.mean((pred[mask] - ref[mask]) ** 2))
    assert per_case(tmp_path, "psnr")["syn3"] == pytest.approx(psnr, abs=1e-3)
    assert per_case(tmp_path, "psnr_brain")["syn3"] == pytest.approx(psnr_brain, abs=1e-3)
    assert (tmp_path / "sr_bspline_x2.png").stat().st_size > 10_000


def test_evaluate_reports_a_method_without_weights_as_not_trained(brain_data, tmp_path):
    missing = tmp_path / "never_trained" / "model.pt"
    result = run_bundle(
        "rem_sr",
        EVAL_CONFIGS,
        evaluate_overrides(brain_data, tmp_path / "out", method="rem", ckpt_path=str(missing)),
        check=False,
    )
    assert result.returncode != 0
    assert f"{missing}: weights file not found" in result.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_rejects_weights_of_another_architecture(trained, brain_data, tmp_path):
    out, _ = trained
    result = run_bundle(
        "rem_sr",
        EVAL_CONFIGS,
        {
            **evaluate_overrides(brain_data, tmp_path / "out"),
            "rem_k": 16,
            "rem_n": 8,
            "ckpt_path": str(out / "models" / "model.pt"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert "weights do not match the configured network REM" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ddp_run(brain_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rem_ddp")
    run_bundle(
        "rem_sr",
        ["train.json", "multi_gpu_train.json"],
        {
            **TINY_TRAIN,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist.json"),
            # training items reach the collate as image + label only: identify them by the image's file
            **ddp_probes(out, item_id="d['image'].meta['filename_or_obj']"),
        },
        torchrun_nproc=2,
    )
    return out


def test_multi_gpu_train_with_two_gloo_processes(ddp_run, brain_data):
    state = torch.load(ddp_run / "models_rank0" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in state)
    training = json.loads((brain_data / "datalist.json").read_text())["training"]
    names = {os.path.basename(item.get("image", item.get("labels"))) for item in training}
    # MONAI's DistributedWeightedRandomSampler: each rank draws, with the mix's weights, from its own shard of the
    # items, a new shard split every epoch (val_interval = 2 batches): within an epoch the ranks never share an item
    shards = [(ddp_run / f"shard_rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == TINY_TRAIN["max_iterations"]  # DDP steps in lock-step
    per_epoch = TINY_TRAIN["val_interval"]
    for start in range(0, len(shards[0]), per_epoch):
        seen = [{n for batch in shard[start : start + per_epoch] for n in batch.split("|")} for shard in shards]
        assert not seen[0] & seen[1], seen
        assert seen[0] | seen[1] <= names
    assert (ddp_run / "models_rank0" / "checkpoint_final.pt").is_file()
    assert any((ddp_run / "logs_rank0").glob("events.out.tfevents*"))
    assert not list((ddp_run / "logs_rank1").rglob("events.out.tfevents*"))  # TensorBoard on rank 0 only


def test_multi_gpu_rank1_writes_no_files(ddp_run):
    assert rank1_files(ddp_run) == []


@pytest.mark.parametrize("problem", ["nan", "missing", "not3d", "too_small"])
def test_inference_rejects_bad_input_without_writing(trained, tmp_path, problem):
    out, _ = trained
    path = tmp_path / "input.nii.gz"
    if problem == "nan":
        data = np.ones((8, 8, 8), np.float32)
        data[0, 0, 0] = np.nan
        save_nifti(data, path)
        expected = "NaN"
    elif problem == "not3d":
        nib.save(nib.Nifti1Image(np.ones((8, 8), np.float32), np.eye(4)), str(path))
        expected = "expected a 3D volume"
    elif problem == "too_small":
        save_nifti(np.ones((8, 8, 2), np.float32), path)
        expected = "smaller than the minimum"
    else:
        expected = "file not found"
    (tmp_path / "dl.json").write_text(json.dumps({"test": [{"image": str(path)}]}))
    result = run_bundle(
        "rem_sr",
        ["inference.json"],
        {
            **TINY_NET,
            "datalist": str(tmp_path / "dl.json"),
            "dataset_dir": str(tmp_path),
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path / "out"),
        },
        check=False,
    )
    assert result.returncode != 0
    assert expected in result.stderr and str(path) in result.stderr
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


def test_inference_rejects_weights_of_another_architecture(trained, brain_data, tmp_path):
    out, _ = trained
    result = run_bundle(
        "rem_sr",
        ["inference.json"],
        {
            "rem_k": 16,
            "rem_n": 8,
            "dataset_dir": str(brain_data),
            "datalist": str(brain_data / "datalist_lr_x2.json"),
            "scale": 2,
            "ckpt_path": str(out / "models" / "model.pt"),
            "output_dir": str(tmp_path),
        },
        check=False,
    )
    assert result.returncode != 0
    assert "weights do not match" in result.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
