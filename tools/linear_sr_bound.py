#!/usr/bin/env python
"""How well can ONE linear filter super-resolve? The analysis behind rem_sr's weights per kind of input.

A (2r+1)^3 linear filter (plus a bias) is fitted by least squares to map the trilinear-upsampled LR volume (rem_sr's
own degradation, ``scripts/degradation.py``) to the HR volume, on brain voxels sampled from the training templates of
``data/brain/datalist.json``; it is then applied to the test volume and scored by PSNR inside its brain mask (data
range 1, the normalised units of the sample data), beside trilinear and cubic B-spline. Fitted to one degradation at
a time it is the best linear filter for that kind of input; fitted to several at once (``--joint``) it is what one
set of linear weights can do for all of them. A CNN such as REM is not linear, but when it is not told the kind of its
input it faces the same compromise.

Usage:
    python tools/linear_sr_bound.py [--scales 2 4 1x1x4] [--radius 3] [--samples 60000] [--joint]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.benchmark import parse_scale  # noqa: E402
from tools.fetch_sample_data import REPO_ROOT, load_rem_degradation  # noqa: E402


def shifted_copies(volume: np.ndarray, radius: int) -> list[np.ndarray]:
    """The (2r+1)^3 shifted copies of `volume` (edges replicated): the regressors of a linear filter."""
    padded = np.pad(volume, radius, mode="edge")
    n = 2 * radius + 1
    x, y, z = volume.shape
    return [padded[i : i + x, j : j + y, k : k + z] for i in range(n) for j in range(n) for k in range(n)]


def apply_filter(weights: np.ndarray, copies: list[np.ndarray]) -> np.ndarray:
    """The filter's output: the weighted sum of the shifted copies plus the bias (the last weight)."""
    return sum(w * c for w, c in zip(weights[:-1], copies)) + weights[-1]


def degraded(degradation, hr: np.ndarray, scale) -> np.ndarray:
    profile = "gaussian" if isinstance(scale, list) else "none"
    return degradation.degrade(torch.from_numpy(hr)[None], scale, "trilinear", profile)[0].numpy()


def psnr(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((np.clip(pred, 0, 1)[mask] - ref[mask]) ** 2)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "brain")
    parser.add_argument("--scales", nargs="+", type=parse_scale, default=[2.0, 4.0, [1.0, 1.0, 4.0]])
    parser.add_argument("--radius", type=int, default=3, help="filter radius r: (2r+1)^3 taps (default 3)")
    parser.add_argument("--samples", type=int, default=60000, help="brain voxels per training volume and scale")
    parser.add_argument("--joint", action="store_true", help="also fit one filter to all the scales together")
    args = parser.parse_args(argv)
    degradation = load_rem_degradation()
    datalist = json.loads((args.data / "datalist.json").read_text())
    load = lambda rel: np.asarray(nib.load(str(args.data / rel)).dataobj, dtype=np.float32)  # noqa: E731
    train = [load(item["image"]) for item in datalist["training"] if "image" in item]
    test_item = datalist["test"][0]
    test, mask = load(test_item["image"]), load(test_item["mask"]) > 0
    rng = np.random.default_rng(0)
    systems = {}
    for scale in args.scales:
        rows, targets = [], []
        for hr in train:
            idx = rng.choice(np.flatnonzero(hr > 0.02), args.samples, replace=False)
            copies = shifted_copies(degraded(degradation, hr, scale), args.radius)
            rows.append(np.stack([c.ravel()[idx] for c in copies] + [np.ones(len(idx), np.float32)], 1))
            targets.append(hr.ravel()[idx])
        systems[str(scale)] = (np.concatenate(rows), np.concatenate(targets))
    fits = {key: np.linalg.lstsq(a, b, rcond=None)[0] for key, (a, b) in systems.items()}
    if args.joint:
        a = np.concatenate([s[0] for s in systems.values()])
        b = np.concatenate([s[1] for s in systems.values()])
        joint = np.linalg.lstsq(a, b, rcond=None)[0]
    n = 2 * args.radius + 1
    print(
        f"test {test_item['name']}, PSNR (dB) inside the brain mask; linear {n}x{n}x{n} filters fitted on "
        f"{len(train)} training volumes x {args.samples} voxels"
    )
    print("| input | trilinear | cubic B-spline | linear, fitted to this input | linear, fitted to all |")
    print("|---|---|---|---|---|")
    for scale in args.scales:
        up = degraded(degradation, test, scale)
        profile = "gaussian" if isinstance(scale, list) else "none"
        bspline = degradation.degrade(torch.from_numpy(test)[None], scale, "bspline", profile)[0].numpy()
        copies = shifted_copies(up, args.radius)
        own = psnr(apply_filter(fits[str(scale)], copies), test, mask)
        all_ = f"{psnr(apply_filter(joint, copies), test, mask):.2f}" if args.joint else "-"
        label = f"x{scale:g}" if isinstance(scale, float) else "x".join(f"{s:g}" for s in scale)
        print(f"| {label} | {psnr(up, test, mask):.2f} | {psnr(bspline, test, mask):.2f} | {own:.2f} | {all_} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
