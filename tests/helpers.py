"""Shared test helpers: tiny synthetic volumes, datalists and the MONAI bundle runner."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def load_bundle_scripts(bundle: str, module: str):
    """Import `scripts.<module>` of one bundle; every bundle has its own `scripts` package, so drop
    any other bundle's copy from sys.modules first."""
    root = str(BUNDLES / bundle)
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(root):
            del sys.modules[name]
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    return importlib.import_module(f"scripts.{module}")


def synthetic_brain(shape=(40, 48, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth ellipsoidal 'brain' with internal structure in [0, 1], and its mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(sum((g / r) ** 2 for g, r in zip(grid, rng.uniform(0.7, 0.9, 3))))
    mask = radius < 1
    texture = sum(np.sin(f * g + p) for f, g, p in zip(rng.uniform(4, 9, 3), grid, rng.uniform(0, 6, 3)))
    image = np.where(mask, 0.55 + 0.12 * texture + 0.25 * (radius < 0.5), 0.0)
    return np.clip(image, 0, 1).astype(np.float32), mask.astype(np.uint8)


def save_nifti(array: np.ndarray, path: Path, spacing: float = 1.0, origin=(0.0, 0.0, 0.0)) -> Path:
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = origin
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def make_brain_dataset(root: Path, n_train: int = 2, shape=(40, 48, 40)) -> Path:
    """HR volumes + masks + datalist (training/validation/test), plus nibabel's anatomical.nii (scaled to
    [0, 1]) as an extra training and test volume, a label map (the first volume's intensities in 4 classes) as a
    training item for rem_sr's synthesis, and LR x2 copies of the test volumes for inference."""
    root.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n_train + 2):
        image, mask = synthetic_brain(shape, seed=i)
        save_nifti(image, root / f"syn{i}_T1w.nii.gz", origin=(-20.0, -24.0, -20.0))
        save_nifti(mask, root / f"syn{i}_mask.nii.gz", origin=(-20.0, -24.0, -20.0))
        items.append({"name": f"syn{i}", "image": f"syn{i}_T1w.nii.gz", "mask": f"syn{i}_mask.nii.gz"})
    anat = nib.load(str(ANATOMICAL))
    data = np.asarray(anat.dataobj, dtype=np.float32)
    data = np.clip(data / np.percentile(data[data > 0], 99.5), 0, 1)
    nib.save(nib.Nifti1Image(data, anat.affine), str(root / "anatomical_T1w.nii.gz"))
    anat_item = {"name": "anatomical", "image": "anatomical_T1w.nii.gz"}
    image, mask = synthetic_brain(shape, seed=0)
    labels = (np.digitize(image, [0.01, 0.45, 0.6, 0.75]) * mask).astype(np.int16)
    save_nifti(labels, root / "syn_labels.nii.gz", origin=(-20.0, -24.0, -20.0))
    label_item = {"name": "syn_labels", "labels": "syn_labels.nii.gz"}
    datalist = {
        "training": items[:n_train] + [anat_item, label_item],
        "validation": [items[n_train]],
        "test": [items[n_train + 1], anat_item],
    }
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2))
    lr_items = []
    for item in datalist["test"]:
        img = nib.load(str(root / item["image"]))
        hr = np.asarray(img.dataobj, dtype=np.float32)
        hr = hr[: hr.shape[0] // 2 * 2, : hr.shape[1] // 2 * 2, : hr.shape[2] // 2 * 2]
        lr = hr.reshape(hr.shape[0] // 2, 2, hr.shape[1] // 2, 2, hr.shape[2] // 2, 2).mean(axis=(1, 3, 5))
        # LR voxel i averages HR voxels 2i and 2i+1: its centre is HR index 2i + 0.5
        to_hr_index = np.diag([2.0, 2.0, 2.0, 1.0])
        to_hr_index[:3, 3] = 0.5
        affine = img.affine @ to_hr_index
        nib.save(nib.Nifti1Image(lr, affine), str(root / f"lr_{item['image']}"))
        lr_items.append({"image": f"lr_{item['image']}", "reference": item["image"]})
    (root / "datalist_lr_x2.json").write_text(json.dumps({"test": lr_items}, indent=2))
    return root


def bundle_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_bundle(
    bundle: str,
    configs: list[str],
    overrides: dict | None = None,
    check: bool = True,
    torchrun_nproc: int | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    """Run `python -m monai.bundle run` (or torchrun) on a bundle config from the repo root."""
    root = BUNDLES / bundle
    files = [str(root / "configs" / c) for c in configs]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    if torchrun_nproc:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(torchrun_nproc),
            "--master_port",
            str(29500 + os.getpid() % 1000),
            "-m",
            "monai.bundle",
            "run",
        ]
    else:
        cmd = [sys.executable, "-m", "monai.bundle", "run"]
    cmd += ["--config_file", config_arg, "--bundle_root", str(root)]
    for key, value in (overrides or {}).items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, env=bundle_env(), timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"bundle run failed ({result.returncode}):\n{' '.join(cmd)}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def synthetic_labels(shape=(40, 48, 40), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic brain and a consistent 4-label map (label ids shared by every subject): the image
    intensity is a function of the labels, so subjects differ by shape, like inter-subject pairs."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    warp = 0.08 * np.stack([np.sin(rng.uniform(1, 3) * g + rng.uniform(0, 6)) for g in grid[::-1]])
    g = grid + warp
    radius = np.sqrt((g[0] / 0.8) ** 2 + (g[1] / 0.85) ** 2 + (g[2] / 0.75) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[radius < 1.0] = 1
    labels[(radius < 0.75)] = 2
    labels[(radius < 0.75) & (g[0] > 0.1)] = 3
    labels[np.sqrt((g[0] + 0.3) ** 2 + g[1] ** 2 + g[2] ** 2) < 0.25] = 4
    intensity = np.array([0.0, 0.45, 0.8, 0.7, 0.6], np.float32)
    image = intensity[labels] + rng.normal(0, 0.01, shape).astype(np.float32) * (labels > 0)
    return np.clip(image, 0, 1).astype(np.float32), labels


def make_pair_dataset(root: Path, shape=(32, 40, 32)) -> Path:
    """Four synthetic subjects with labels; pairs: training 0<->1, validation 2->0, test 3->2 and 2->3."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(4):
        image, labels = synthetic_labels(shape, seed=i)
        save_nifti(image, root / f"sub{i}_T1w.nii.gz")
        save_nifti(labels, root / f"sub{i}_labels.nii.gz")

    def pair(f, m):
        return {
            "name": f"sub{m}_to_sub{f}",
            "fixed_image": f"sub{f}_T1w.nii.gz",
            "moving_image": f"sub{m}_T1w.nii.gz",
            "fixed_label": f"sub{f}_labels.nii.gz",
            "moving_label": f"sub{m}_labels.nii.gz",
        }

    datalist = {"training": [pair(0, 1), pair(1, 0)], "validation": [pair(0, 2)], "test": [pair(2, 3), pair(3, 2)]}
    (root / "datalist.json").write_text(json.dumps(datalist, indent=2))
    return root


def ddp_probes(tmp_path, item_id: str = "d['name']") -> dict:
    """Config overrides for a torchrun test: per-rank ckpt_dir/log_dir (models_rank<r>, logs_rank<r>), so what each
    rank writes can be told apart, and a collate_fn that logs an id of every item of every training batch
    (`item_id`, an expression of the item `d`; by default its datalist name) to shard_rank<r>.txt (one line per
    batch) before MONAI's list_data_collate."""
    rank = "os.environ['RANK']"
    names = f"[{item_id} for x in items for d in (x if isinstance(x, list) else [x])]"
    return {
        "ckpt_dir": f"$'{tmp_path}/models_rank' + {rank}",
        "log_dir": f"$'{tmp_path}/logs_rank' + {rank}",
        "train#dataloader#collate_fn": f"$lambda items, _f='{tmp_path}/shard_rank' + {rank} + '.txt': "
        f"(open(_f, 'a').write('|'.join(sorted(os.path.basename(str(n)) for n in "
        f"{names})) + chr(10)), monai.data.list_data_collate(items))[1]",
    }


def assert_disjoint_shards_and_rank0_checkpoints(tmp_path, all_names: set[str]) -> None:
    shards = [(tmp_path / f"shard_rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert shards[0] and len(shards[0]) == len(shards[1])  # DDP steps in lock-step
    for batch0, batch1 in zip(*shards):  # one batch per rank covers one pass over the (tiny) training set
        seen0, seen1 = set(batch0.split("|")), set(batch1.split("|"))
        assert not seen0 & seen1, (batch0, batch1)  # disjoint shards (DistributedSampler)
        assert {os.path.basename(n) for n in seen0 | seen1} == all_names
    assert (tmp_path / "models_rank0" / "model.pt").is_file()
    assert (tmp_path / "models_rank0" / "checkpoint_final.pt").is_file()
    assert any((tmp_path / "logs_rank0").glob("events.out.tfevents*"))
    assert not list((tmp_path / "logs_rank1").rglob("events.out.tfevents*"))  # TensorBoard on rank 0 only
    assert (tmp_path / "models_rank1").is_dir() and not list((tmp_path / "models_rank1").iterdir())


def rank1_files(tmp_path) -> list:
    return [p for d in ("models_rank1", "logs_rank1") for p in (tmp_path / d).rglob("*") if p.is_file()]
