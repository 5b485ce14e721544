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


def load_volume(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"file not found: {path}")
    data = np.asarray(nib.load(str(path)).dataobj, dtype=np.float32)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return torch.from_numpy(data)[None, None]


def _label_dice():
    """refdrn's `mean_label_dice` (mean over the labels of the fixed map, background excluded), loaded from its file:
    the same Dice for either bundle, without importing refdrn's `scripts` package beside another bundle's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refdrn_metrics", BUNDLES / "refdrn" / "scripts" / "metrics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mean_label_dice


def bundle_loss_and_images(args, moving: torch.Tensor, fixed: torch.Tensor):
    sys.path.insert(0, str(BUNDLES / args.bundle))
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
    from scripts.losses import ReFDRNLoss

    d = DegradePaird(keys=["moving_image", "fixed_image"], scale=args.scale)(
        {"moving_image": moving[0], "fixed_image": fixed[0]}
    )
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
    parser.add_argument("--direction", default="ct2mri", help="f3rnet_ct_mri only")
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
    items = json.loads(args.datalist.read_text()).get(args.section) or []
    if not 0 <= args.index < len(items):
        parser.error(f"{args.datalist}: section {args.section!r} has {len(items)} pairs, no index {args.index}")
    item, root = items[args.index], args.dataset_dir or args.datalist.parent
    if "moving_label" not in item or "fixed_label" not in item:
        parser.error(f"{args.datalist}: pair {args.index} has no labels; Dice needs moving_label and fixed_label")
    moving, fixed = load_volume(root / item["moving_image"]), load_volume(root / item["fixed_image"])
    moving_label, fixed_label = load_volume(root / item["moving_label"]), load_volume(root / item["fixed_label"])
    if not moving.shape == fixed.shape == moving_label.shape == fixed_label.shape:
        parser.error(f"pair {args.index}: images and labels must share one grid")
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
