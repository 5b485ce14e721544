#!/usr/bin/env python
"""Sanity check of a registration bundle's loss: optimise a displacement field directly on one pair.

No network is involved. A coarse control grid of displacements (``--grid`` points per axis, trilinearly
upsampled to a dense DDF in voxel units) is fitted to one pair of a datalist with Adam, using the bundle's own
training loss and MONAI's ``Warp``. Label Dice (mean over the labels of the fixed label map) is printed along the
way. If Dice rises well above identity, the loss and the warping are sound, and a network that fails to improve
on identity is short of training, not broken. This is classical instance optimisation (like elastix, in
miniature).

- ``f3rnet_ct_mri``: images normalised with the bundle's ``NormalizeCTMRd`` (``--direction``), loss
  ``F3RNetLoss`` (MIND-SSC L1 + lambda * ||grad u||^2, lambda 1.5).
- ``refdrn``: both images degraded with the bundle's ``DegradePaird`` (``--scale``, the paper's down-up
  protocol), loss ``ReFDRNLoss`` without REM and without the auxiliary term (LNCC + shift regulariser, mean
  reduction).

``--downsample 2`` averages images (and subsamples labels) by 2 first, so the check takes a minute on a CPU.

Usage: python tools/fit_pair.py --bundle f3rnet_ct_mri --datalist data/abdomen_phantoms/datalist_ct2mri.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
if __package__ in (None, ""):
    sys.path.insert(0, str(REPO_ROOT))
from tools.niftiio import check_label_values, fail, label_onto_grid, read_volume, same_grid  # noqa: E402

IMAGE_KEYS = ("moving_image", "fixed_image")
LABEL_KEYS = ("moving_label", "fixed_label")


def load_ras(path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Data and affine of a volume reoriented to RAS (nibabel, `tools.niftiio.read_volume`: trailing singleton axes
    squeezed; a non-singleton extra axis, an unreadable or missing file is an error naming it), so that the result
    does not depend on how the arrays are stored."""
    data, affine = read_volume(path, what)
    img = nib.as_closest_canonical(nib.Nifti1Image(data, affine))
    return np.asanyarray(img.dataobj), img.affine


def load_pair(item: dict, root: Path, where: str) -> tuple[torch.Tensor, ...]:
    """moving, fixed, moving label, fixed label as ``[1, 1, x, y, z]`` float32 tensors on one RAS grid.

    Each label is brought onto its image's grid by world coordinates (nearest neighbour) when its shape or affine
    differs; its ids are renumbered 0..n-1 in ascending order over both maps (Dice is unchanged; ids > 255 or in the
    thousands keep their identity). The moving and fixed images must share one grid (the bundles' pairs do).
    """
    paths = {}
    for key in IMAGE_KEYS + LABEL_KEYS:
        if not isinstance(item.get(key), str):
            raise fail(f"{where} has no {key} (Dice needs moving/fixed images and labels)")
        paths[key] = Path(item[key]) if Path(item[key]).is_absolute() else root / item[key]
        if not paths[key].is_file():
            raise fail(f"{where}: {key} {paths[key]} not found (relative paths are resolved against {root})")
    volumes = {key: load_ras(paths[key], key) for key in IMAGE_KEYS + LABEL_KEYS}
    (moving, moving_affine), (fixed, fixed_affine) = volumes["moving_image"], volumes["fixed_image"]
    if not same_grid(moving.shape, moving_affine, fixed.shape, fixed_affine):
        raise fail(
            f"{where}: moving_image {paths['moving_image']} (shape {moving.shape}, affine "
            f"{np.round(moving_affine, 3).tolist()}) and fixed_image {paths['fixed_image']} (shape {fixed.shape}, "
            f"affine {np.round(fixed_affine, 3).tolist()}) are not on one grid; resample the pair onto one grid first"
        )
    labels = []
    for key, image_key in zip(LABEL_KEYS, IMAGE_KEYS):
        data, affine = volumes[key]
        data = check_label_values(data, paths[key], key)
        labels.append(label_onto_grid(data, affine, fixed.shape, fixed_affine, paths[key], paths[image_key]))
    _, inverse = np.unique(np.concatenate([lab.ravel() for lab in labels]), return_inverse=True)
    labels = np.split(inverse.astype(np.float32), [labels[0].size])
    tensors = [np.asarray(moving, np.float32), np.asarray(fixed, np.float32)]
    tensors += [lab.reshape(fixed.shape) for lab in labels]
    return tuple(torch.from_numpy(np.ascontiguousarray(t))[None, None] for t in tensors)


def _label_dice():
    """refdrn's `mean_label_dice` (mean over the labels of the fixed map, background excluded), loaded from its file:
    the same Dice for either bundle, without importing refdrn's `scripts` package beside another bundle's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refdrn_metrics", BUNDLES / "refdrn" / "scripts" / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mean_label_dice


def _use_bundle_scripts(bundle: str) -> None:
    """Make ``scripts`` mean `bundle`'s package in this process (another bundle's may be imported already), with
    the bundle's own ``common.use_bundle_scripts``, loaded from its file (it imports nothing from ``scripts``)."""
    import importlib.util

    root = BUNDLES / bundle
    spec = importlib.util.spec_from_file_location(f"{bundle}_common", root / "scripts" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.use_bundle_scripts(str(root))


def bundle_loss_and_images(args, moving: torch.Tensor, fixed: torch.Tensor):
    _use_bundle_scripts(args.bundle)
    if args.bundle == "f3rnet_ct_mri":
        from scripts.losses import F3RNetLoss
        from scripts.transforms import NormalizeCTMRd

        d = NormalizeCTMRd(direction=args.direction)({"moving_image": moving[0], "fixed_image": fixed[0]})
        loss = F3RNetLoss(lam=1.5, mind_penalty="l1")
        return (
            (lambda warped, target, ddf: loss.components(warped, target, ddf)["loss"]),
            d["moving_image"][None],
            d["fixed_image"][None],
        )
    from scripts.data import DegradePaird
    from scripts.intensity import PercentileScaled
    from scripts.losses import ReFDRNLoss

    d = PercentileScaled(keys=["moving_image", "fixed_image"], clip=True, factor_key=None, offset_key=None)(
        {"moving_image": moving[0], "fixed_image": fixed[0]}
    )  # raw intensities to the training units, as refdrn's train.json does
    d = DegradePaird(keys=["moving_image", "fixed_image"], scale=args.scale)(d)
    loss = ReFDRNLoss(rem=None, lambda1=0.0, lambda2=1.0, reg_reduction="mean")
    mov, fix = d["moving_image_lr"][None], d["fixed_image_lr"][None]
    return (
        (lambda warped, target, ddf: loss.similarity(warped, target) + loss.lambda2 * loss.regularization(ddf)),
        mov,
        fix,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, choices=["f3rnet_ct_mri", "refdrn"])
    parser.add_argument("--datalist", required=True, type=Path)
    parser.add_argument("--dataset-dir", type=Path, default=None, help="default: the datalist's folder")
    parser.add_argument("--section", default="training")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--direction", default="ct2mri", choices=["ct2mri", "mri2ct"], help="f3rnet_ct_mri only")
    parser.add_argument("--scale", type=float, default=4, help="refdrn only: LR degradation factor")
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--grid", type=int, default=8, help="control points per axis")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from monai.networks.blocks import Warp

    if not args.datalist.is_file():
        parser.error(f"datalist not found: {args.datalist}")
    try:
        datalist = json.loads(args.datalist.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        parser.error(f"cannot read the datalist {args.datalist}: {exc}")
    if not isinstance(datalist, dict) or not isinstance(datalist.get(args.section, []), list):
        parser.error(f"{args.datalist}: expected a JSON object of lists of pairs")
    items = datalist.get(args.section) or []
    if not 0 <= args.index < len(items):
        parser.error(
            f"{args.datalist}: section {args.section!r} has {len(items)} pairs, no index {args.index} "
            f"(sections: {', '.join(k for k, v in datalist.items() if isinstance(v, list))})"
        )
    item, root = items[args.index], args.dataset_dir or args.datalist.parent
    if not isinstance(item, dict):
        parser.error(f"{args.datalist}: {args.section}[{args.index}] is not a dict of file paths")
    moving, fixed, moving_label, fixed_label = load_pair(item, root, f"{args.datalist} {args.section}[{args.index}]")
    loss_fn, moving, fixed = bundle_loss_and_images(args, moving, fixed)
    f = max(1, args.downsample)
    if f > 1:
        moving, fixed = F.avg_pool3d(moving, f), F.avg_pool3d(fixed, f)
        moving_label, fixed_label = moving_label[..., ::f, ::f, ::f], fixed_label[..., ::f, ::f, ::f]
    shape = moving.shape[2:]
    mean_dice = _label_dice()
    warp, warp_label = Warp(mode="bilinear", padding_mode="border"), Warp(mode="nearest", padding_mode="zeros")
    control = torch.zeros(1, 3, *(min(args.grid, s) for s in shape), requires_grad=True)
    optimizer = torch.optim.Adam([control], lr=args.lr)
    print(
        f"{item.get('name', args.index)}: {tuple(shape)} voxels, "
        f"identity Dice {mean_dice(moving_label, fixed_label):.4f}"
    )
    for it in range(args.iterations + 1):
        ddf = F.interpolate(control, size=shape, mode="trilinear", align_corners=True)
        loss = loss_fn(warp(moving, ddf), fixed, ddf)
        if it % 10 == 0 or it == args.iterations:
            with torch.no_grad():
                dice = mean_dice(warp_label(moving_label, ddf), fixed_label)
            print(
                f"iteration {it:4d}  loss {float(loss):.4f}  Dice {dice:.4f}  "
                f"max|u| {float(ddf.abs().max()):.2f} voxels",
                flush=True,
            )
        if it < args.iterations:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return 0


if __name__ == "__main__":
    sys.exit(main())
