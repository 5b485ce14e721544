#!/usr/bin/env python
"""Turn an LPBA40 download into the refdrn registration datalist.

LPBA40 (LONI Probabilistic Brain Atlas, 40 subjects) is not redistributable, so users download
it themselves and point this tool at it. The tool reads, for each subject SNN,

    <root>/delineation_space/SNN/SNN.delineation.skullstripped.img       (+ .hdr, Analyze 7.5)
    <root>/delineation_space/SNN/SNN.delineation.structure.label.img     (+ .hdr, Analyze 7.5)

(`<root>` may also be the `delineation_space` folder itself), and for every subject

0. checks every subject before writing anything (nibabel is the one reader; a label map on another grid is
   brought onto its image's grid by world coordinates, nearest neighbour; one that misses its image, a
   non-singleton extra axis and label ids outside the 56 structures are errors naming the file),
1. squeezes trailing singleton axes, reorients to RAS and resamples to 1 mm isotropic
   (trilinear for the image, nearest neighbour for the labels; `--spacing 0` keeps the grid),
2. remaps the 56 structure ids (21-34, 41-50, 61-68, 81-92, 101-102, 121-122, 161-166, 181, 182)
   to 1..56 in ascending order (0 stays background; any other id is an error),
3. crops/pads to 160x208x176 around the centre of the brain's bounding box (non-zero voxels),
   updating the affine, and scales intensities to [0, 1]: background (the lowest value) 0, the brain's 99.5th
   percentile 1 (a global scale or offset of the input, e.g. z-scoring, does not change the output),
4. writes ``<out>/images/SNN_T1w.nii.gz`` (float32) and ``<out>/labels/SNN_label.nii.gz`` (uint8).

It then writes ``<out>/datalist.json``: a 30/4/6 subject split (S01-S30 training, S31-S34
validation, S35-S40 test; `--split-seed` shuffles the subjects first) and registration pairs
within each split: all ordered pairs of distinct training subjects, and for validation and test
every other subject registered to the split's first subject (the paper's protocol: one test
image fixed, the other five registered to it). Pair names read ``<moving>_to_<fixed>``.

Usage: python tools/prepare_lpba40.py --root /path/to/LPBA40 [--out data/lpba40] [--split-seed N]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import (  # noqa: E402
    atomic_save,
    atomic_write_text,
    check_label_values,
    label_onto_grid,
    prepare_out_dir,
    read_volume,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET_SHAPE = (160, 208, 176)
DEFAULT_SPACING = 1.0
NUM_SUBJECTS = 40
SUBJECTS = [f"S{i:02d}" for i in range(1, NUM_SUBJECTS + 1)]
SPLIT_FRACTIONS = {"training": 30, "validation": 4, "test": 6}  # out of 40
SPLITS = ("training", "validation", "test")
IMAGE_SUFFIX = ".delineation.skullstripped.img"
LABEL_SUFFIX = ".delineation.structure.label.img"

# The 56 LPBA40 structures, ascending; new id = position + 1.
LPBA40_LABEL_IDS = (
    list(range(21, 35))
    + list(range(41, 51))
    + list(range(61, 69))
    + list(range(81, 93))
    + [101, 102, 121, 122]
    + list(range(161, 167))
    + [181, 182]
)
assert len(LPBA40_LABEL_IDS) == 56 and LPBA40_LABEL_IDS == sorted(LPBA40_LABEL_IDS)
LABEL_MAP = {orig: new for new, orig in enumerate(LPBA40_LABEL_IDS, start=1)}  # original id -> new id


# ----------------------------------------------------------------------------------------- input
def resolve_delineation_dir(root: Path) -> Path:
    """Accept the folder that contains `delineation_space`, or `delineation_space` itself."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: LPBA40 root {root} does not exist or is not a folder")
    if (root / "delineation_space").is_dir():
        return root / "delineation_space"
    if root.name == "delineation_space" or any(p.is_dir() and re.fullmatch(r"S\d\d", p.name) for p in root.iterdir()):
        return root
    raise SystemExit(
        f"error: {root} holds neither a delineation_space folder nor LPBA40 subject folders (S01..S40); "
        f"point --root at the LPBA40 folder that contains delineation_space"
    )


def subject_files(base: Path, subject: str) -> tuple[Path, Path]:
    folder = base / subject
    return folder / f"{subject}{IMAGE_SUFFIX}", folder / f"{subject}{LABEL_SUFFIX}"


def check_inputs(base: Path, subjects: list[str]) -> None:
    """Fail before any work when a subject folder or one of its four files is missing."""
    missing_dirs = [s for s in subjects if not (base / s).is_dir()]
    if missing_dirs:
        raise SystemExit(
            f"error: missing LPBA40 subject folder(s) in {base}: {', '.join(missing_dirs)} "
            f"(expected {base}/SNN/SNN{IMAGE_SUFFIX} and SNN{LABEL_SUFFIX})"
        )
    missing_files = []
    for s in subjects:
        for img in subject_files(base, s):
            missing_files += [str(p) for p in (img, img.with_suffix(".hdr")) if not p.is_file()]
    if missing_files:
        raise SystemExit("error: missing LPBA40 file(s):\n  " + "\n  ".join(missing_files))


def load_3d(path: Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Data (trailing singleton axes of any count squeezed) and affine of an Analyze/NIfTI volume, read with nibabel
    (`tools.niftiio.read_volume`: a non-singleton 4th axis, an unreadable file or NaN values are an error)."""
    return read_volume(path, what)


# ------------------------------------------------------------------------------------ processing
def remap_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    """Map the 56 LPBA40 ids to 1..56 (uint8); any other non-zero id (negative, > 255 or not an LPBA40 structure)
    and non-integer values are an error naming the file."""
    as_int = check_label_values(labels, path)
    ids = np.unique(as_int)
    unexpected = [int(i) for i in ids if i != 0 and int(i) not in LABEL_MAP]
    if unexpected:
        raise SystemExit(
            f"error: {path} has unexpected label id(s) {unexpected}; LPBA40 labels are 0 and "
            f"{LPBA40_LABEL_IDS[0]}..{LPBA40_LABEL_IDS[-1]} ({len(LPBA40_LABEL_IDS)} structures)"
        )
    lut = np.zeros(max(LABEL_MAP) + 1, dtype=np.uint8)
    for orig, new in LABEL_MAP.items():
        lut[orig] = new
    return lut[as_int]


def resample(data: np.ndarray, affine: np.ndarray, spacing: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample an axis-aligned (RAS) volume to isotropic `spacing` mm, keeping voxel 0's centre in place."""
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    if spacing <= 0 or np.allclose(zooms, spacing, atol=1e-3):
        return data, affine
    step = spacing / zooms  # input voxels per output voxel
    shape = tuple(int(np.floor((n - 1) / s + 1e-6)) + 1 for n, s in zip(data.shape, step))
    out = ndimage.affine_transform(
        data, step, output_shape=shape, order=order, mode="constant", cval=0.0, prefilter=False
    )
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * step  # scales column j by step[j]
    return out, new_affine


def crop_or_pad(
    data: np.ndarray, affine: np.ndarray, center: np.ndarray, shape: tuple[int, int, int] = TARGET_SHAPE
) -> tuple[np.ndarray, np.ndarray]:
    """Take a `shape` box centred on `center` (voxels), zero-padding outside the volume."""
    out = np.zeros(shape, dtype=data.dtype)
    start = np.round(center - np.array(shape) / 2).astype(int)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.array(shape), data.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    if np.all(src_hi > src_lo):
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[
            tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
        ]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, new_affine


def load_subject(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The image (float32), its labels remapped to 1..56 on the image's grid, and the image's affine.

    The label map is brought onto the image's grid by world coordinates (nearest neighbour) when its shape or affine
    differs; one that does not overlap the image, bad label ids and an image without non-zero voxels are errors
    naming the file. Used by the pre-flight check of every subject and by the processing itself.
    """
    image, affine = load_3d(image_path, "image")
    labels, label_affine = load_3d(label_path, "label")
    labels = remap_labels(labels, label_path)  # before resampling: interpolation never invents ids
    labels = label_onto_grid(labels, label_affine, image.shape, affine, label_path, image_path)
    image = image.astype(np.float32)
    if not image.size or image.min() == image.max():
        raise SystemExit(f"error: {image_path} is empty (constant, no brain voxels)")
    return image, labels, affine


def process_subject(
    image_path: Path, label_path: Path, spacing: float = DEFAULT_SPACING
) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    image, labels, affine = load_subject(image_path, label_path)
    # background (the lowest value, 0 for LPBA40) to 0: a global offset of the input (a z-scored volume) changes nothing
    image = image - image.min()

    # reorient both with the image's affine (the label map lies on the image's grid)
    image_img = nib.as_closest_canonical(nib.Nifti1Image(image, affine))
    label_img = nib.as_closest_canonical(nib.Nifti1Image(labels, affine))
    image, ras_affine = np.asarray(image_img.dataobj, dtype=np.float32), image_img.affine
    labels = np.asarray(label_img.dataobj).astype(np.uint8)

    image, new_affine = resample(image, ras_affine, spacing, order=1)
    labels, _ = resample(labels, ras_affine, spacing, order=0)
    image = np.clip(image, 0, None)
    coords = np.argwhere(image > 0)
    if not len(coords):
        raise SystemExit(f"error: {image_path} is empty (no non-zero voxels)")
    center = (coords.min(axis=0) + coords.max(axis=0) + 1) / 2  # middle of the brain's bounding box
    image, out_affine = crop_or_pad(image, new_affine, center)
    labels, _ = crop_or_pad(labels, new_affine, center)

    brain = image[image > 0]
    upper = float(np.percentile(brain, 99.5)) if brain.size else 0.0
    if upper <= 0:
        raise SystemExit(f"error: {image_path} has no brain voxels inside the {TARGET_SHAPE} crop")
    image = np.clip(image / upper, 0.0, 1.0).astype(np.float32)

    image_out = nib.Nifti1Image(image, out_affine)
    image_out.header.set_xyzt_units("mm")
    label_out = nib.Nifti1Image(labels.astype(np.uint8), out_affine)
    label_out.header.set_data_dtype(np.uint8)
    label_out.header.set_xyzt_units("mm")
    return image_out, label_out


# ----------------------------------------------------------------------------- split and pairs
def split_sizes(n: int) -> dict[str, int]:
    """30/4/6 of 40 scaled to `n` subjects.

    Test always gets at least one subject. Because evaluation registers pairs *within* a split,
    test and then validation are topped up to two subjects (one pair) while training keeps more
    than two subjects.
    """
    if n < 3:
        raise SystemExit(f"error: need at least 3 LPBA40 subjects for a training/test split, got {n}")

    def scaled(key: str) -> int:  # round half up, unlike round()
        return int(np.floor(n * SPLIT_FRACTIONS[key] / NUM_SUBJECTS + 0.5))

    sizes = {"test": max(1, scaled("test")), "validation": scaled("validation")}
    sizes["training"] = n - sizes["test"] - sizes["validation"]
    for key in ("test", "validation"):
        while sizes[key] < 2 and sizes["training"] > 2:
            sizes[key] += 1
            sizes["training"] -= 1
    return {key: sizes[key] for key in SPLITS}


def split_subjects(subjects: list[str], seed: int | None = None) -> dict[str, list[str]]:
    """Fixed order by default (S01-S30 / S31-S34 / S35-S40); `seed` shuffles deterministically first."""
    order = list(subjects)
    if seed is not None:
        random.Random(seed).shuffle(order)
    sizes = split_sizes(len(order))
    out, start = {}, 0
    for key in SPLITS:
        out[key] = sorted(order[start : start + sizes[key]])
        start += sizes[key]
    return out


def make_pair(moving: str, fixed: str) -> dict:
    return {
        "name": f"{moving}_to_{fixed}",
        "fixed_image": f"images/{fixed}_T1w.nii.gz",
        "moving_image": f"images/{moving}_T1w.nii.gz",
        "fixed_label": f"labels/{fixed}_label.nii.gz",
        "moving_label": f"labels/{moving}_label.nii.gz",
    }


def make_pairs(subjects: list[str], all_pairs: bool) -> list[dict]:
    """All ordered pairs of distinct subjects, or every other subject moving onto the first one."""
    if all_pairs:
        return [make_pair(m, f) for f, m in itertools.permutations(subjects, 2)]
    return [make_pair(m, subjects[0]) for m in subjects[1:]]


def build_datalist(splits: dict[str, list[str]], seed: int | None, spacing: float) -> dict:
    datalist: dict = {
        "description": "LPBA40 T1 brain registration pairs built by tools/prepare_lpba40.py "
        "(pair names read <moving>_to_<fixed>)",
        "spatial_shape": list(TARGET_SHAPE),
        "spacing_mm": spacing if spacing > 0 else "native",
        "split_seed": seed,
        "subjects": splits,
        "labels": {str(new): orig for orig, new in LABEL_MAP.items()},
    }
    for key in SPLITS:
        datalist[key] = make_pairs(splits[key], all_pairs=key == "training")
    return datalist


# ----------------------------------------------------------------------------------------- output


def parse_subject(text: str) -> str:
    match = re.fullmatch(r"[sS]?0*(\d{1,2})", text.strip())
    if not match or not 1 <= int(match.group(1)) <= NUM_SUBJECTS:
        raise argparse.ArgumentTypeError(f"not an LPBA40 subject id (S01..S40 or 1..40): {text!r}")
    return f"S{int(match.group(1)):02d}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--root",
        type=Path,
        required=True,
        help="LPBA40 folder that contains delineation_space (or delineation_space itself)",
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "lpba40", help="output folder")
    parser.add_argument(
        "--split-seed",
        type=int,
        default=None,
        help="shuffle subjects with this seed before the 30/4/6 split (default: subject order)",
    )
    parser.add_argument(
        "--subjects",
        type=parse_subject,
        nargs="+",
        default=None,
        metavar="SNN",
        help="use only these subjects (default: all 40); the split is scaled to their number",
    )
    parser.add_argument(
        "--spacing",
        type=float,
        default=DEFAULT_SPACING,
        help="isotropic output voxel size in mm (default 1.0; 0 keeps the native grid)",
    )
    args = parser.parse_args(argv)

    subjects = sorted(set(args.subjects)) if args.subjects else list(SUBJECTS)
    base = resolve_delineation_dir(args.root)
    check_inputs(base, subjects)
    splits = split_subjects(subjects, args.split_seed)  # fails early on too few subjects

    for subject in tqdm(subjects, desc="checking LPBA40", unit="subject"):  # every input, before any write
        load_subject(*subject_files(base, subject))
    prepare_out_dir(args.out, ("images", "labels"))
    for subject in tqdm(subjects, desc="preparing LPBA40", unit="subject"):
        image_path, label_path = subject_files(base, subject)
        image, labels = process_subject(image_path, label_path, args.spacing)
        atomic_save(image, args.out / "images" / f"{subject}_T1w.nii.gz")
        atomic_save(labels, args.out / "labels" / f"{subject}_label.nii.gz")

    datalist = build_datalist(splits, args.split_seed, args.spacing)
    datalist_path = args.out / "datalist.json"
    atomic_write_text(json.dumps(datalist, indent=2), datalist_path)
    counts = ", ".join(f"{k} {len(splits[k])} subjects / {len(datalist[k])} pairs" for k in SPLITS)
    print(f"LPBA40: {len(subjects)} subjects of {TARGET_SHAPE} in {args.out} ({counts})")
    print(f"datalist: {datalist_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
