#!/usr/bin/env python
"""Peak memory (RSS) and wall time of a bundle's inference as a function of the volume size.

For each size N, synthetic inputs are written (a smooth, textured ellipsoid "body" on a zero background, so that
every intensity step of the bundle runs as on a scan) and the bundle's ``configs/inference.json`` runs on them
through MONAI's bundle runner, one run per size in its own process (``tools/resources.py``: the run's own peak
RSS). The size is the grid the network works on and the outputs are written on:

- ``rem_sr``: an LR input of (N/4)³ voxels at 4 mm, super-resolved ×4 to N³ at 1 mm;
- ``refdrn``: a moving and a fixed LR input of (N/4)³ at 4 mm, super-resolved and registered on N³;
- ``f3rnet_ct_mri``: a CT moving and an MR fixed image of N³ at 1 mm.

Writes ``peak_memory.md`` (a table: grid, voxels, peak RSS, bytes per voxel, wall time, plus the least-squares
line RSS = a + b·voxels) and ``peak_memory.json`` in the output folder; with ``--card`` the table also goes into
the bundle's model card between ``<!-- memory:start -->`` and ``<!-- memory:end -->``.

Usage:
    python tools/peak_memory.py rem_sr [--sizes 128 192 256] [--threads 2] [--output_dir DIR] [--card]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.compare_methods import bundle_run_command  # noqa: E402
from tools.fill_model_card import fill  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402
from tools.resources import run_measured, thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("rem_sr", "refdrn", "f3rnet_ct_mri")
MARKERS = ("<!-- memory:start -->", "<!-- memory:end -->")
LR_FACTOR = 4  # rem_sr and refdrn take ×4 LR inputs


def phantom(shape: tuple[int, int, int], seed: int, ct: bool = False) -> np.ndarray:
    """A smooth textured ellipsoid on a zero background, ``shape`` voxels, float32.

    MR-like values in 0..~1000, or CT-like Hounsfield units (-1000 air, ~40 soft tissue) when `ct`.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n, dtype=np.float32) for n in shape], indexing="ij")
    radius = sum((g / r) ** 2 for g, r in zip(grid, (0.8, 0.9, 0.85)))
    coarse = rng.standard_normal([max(4, n // 8) for n in shape]).astype(np.float32)
    texture = gaussian_filter(coarse, 1.5, mode="wrap")
    texture = np.kron(texture, np.ones([-(-n // c) for n, c in zip(shape, coarse.shape)], np.float32))
    texture = texture[: shape[0], : shape[1], : shape[2]]
    body = radius <= 1
    if ct:
        return np.where(body, 40 + 60 * texture, -1000).astype(np.float32)
    return np.where(body, 600 + 250 * texture, 0).clip(0).astype(np.float32)


def write_inputs(bundle: str, size: int, folder: Path) -> dict[str, str]:
    """The synthetic input file(s) of one size for `bundle`; returns the inference overrides that name them."""
    folder.mkdir(parents=True, exist_ok=True)
    if bundle == "f3rnet_ct_mri":
        shape, spacing = (size,) * 3, 1.0
    else:
        if size % LR_FACTOR:
            raise SystemExit(f"error: --sizes must be multiples of {LR_FACTOR} for {bundle} (got {size})")
        shape, spacing = (size // LR_FACTOR,) * 3, float(LR_FACTOR)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -spacing * (np.asarray(shape) - 1) / 2
    files = {}
    roles = {"rem_sr": ("image",), "refdrn": ("moving_image", "fixed_image")}.get(
        bundle, ("moving_image", "fixed_image")
    )
    for seed, role in enumerate(roles):
        ct = bundle == "f3rnet_ct_mri" and role == "moving_image"
        path = folder / f"{role}_{size}.nii.gz"
        nib.save(nib.Nifti1Image(phantom(shape, seed, ct=ct), affine), str(path))
        files[role] = str(path)
    return files


def measure(bundle: str, size: int, threads: int, work: Path) -> dict:
    """One inference run at size `size`: grid, voxels, peak RSS (bytes), wall time (s).

    Raises:
        SystemExit: the run failed (its last output lines are shown).
    """
    bundle_root = ROOT / "bundles" / bundle
    overrides = write_inputs(bundle, size, work / "in")
    cmd = bundle_run_command(
        str(bundle_root / "configs" / "inference.json"), bundle_root, work / f"out_{size}", overrides
    )
    print(f"{bundle}: {size}³ ...", flush=True)
    m = run_measured(cmd, env=thread_env(threads))
    if m.returncode != 0:
        raise SystemExit(f"{m.tail(15)}\nerror: {bundle} inference at {size}³ failed with exit code {m.returncode}")
    voxels = size**3
    row = {
        "size": size,
        "grid": [size] * 3,
        "voxels": voxels,
        "peak_rss_bytes": m.peak_rss_bytes,
        "bytes_per_voxel": m.peak_rss_bytes / voxels,
        "seconds": m.seconds,
    }
    print(f"  peak RSS {m.peak_rss_gb:.2f} GB, {row['bytes_per_voxel']:.0f} B/voxel, {m.seconds:.1f} s", flush=True)
    return row


def linear_fit(rows: list[dict]) -> tuple[float, float] | None:
    """Least-squares ``RSS = a + b * voxels``: (a in GB, b in bytes per voxel); None with fewer than 2 sizes."""
    if len(rows) < 2:
        return None
    x = np.array([r["voxels"] for r in rows], float)
    y = np.array([r["peak_rss_bytes"] for r in rows], float)
    b, a = np.polyfit(x, y, 1)
    return a / 1e9, b


def markdown(bundle: str, rows: list[dict], threads: int, command: str) -> str:
    """The table of one bundle's measurements."""
    what = {
        "rem_sr": "LR input (N/4)³ at 4 mm, SR output N³",
        "refdrn": "moving and fixed LR inputs (N/4)³ at 4 mm, registered on N³",
        "f3rnet_ct_mri": "CT moving and MR fixed N³ at 1 mm",
    }[bundle]
    lines = [
        f"Peak RSS of `inference.json` per volume size ({what}; {threads} threads, CPU), measured by `{command}`:",
        "",
        "| grid N³ | voxels | peak RSS (GB) | bytes per voxel | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']}³ | {r['voxels'] / 1e6:.2f} M | {r['peak_rss_bytes'] / 1e9:.2f} | "
            f"{r['bytes_per_voxel']:.0f} | {r['seconds']:.1f} |"
        )
    fit = linear_fit(rows)
    if fit is not None:
        a, b = fit
        lines += ["", f"Least-squares fit: peak RSS ≈ {a:.2f} GB + {b:.0f} bytes × voxels."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", choices=BUNDLES)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256], help="grid edge lengths N")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each run (default 2)")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/memory/<bundle>")
    parser.add_argument("--card", action="store_true", help="also paste the table into the bundle's model card")
    args = parser.parse_args(argv)
    out_dir = (args.output_dir or ROOT / "outputs" / "memory" / args.bundle).resolve()
    with tempfile.TemporaryDirectory(prefix="peak_memory_") as tmp:
        rows = [measure(args.bundle, size, args.threads, Path(tmp)) for size in sorted(args.sizes)]
    command = f"python tools/peak_memory.py {args.bundle} --sizes {' '.join(map(str, sorted(args.sizes)))}"
    command += f" --threads {args.threads}"
    table = markdown(args.bundle, rows, args.threads, command)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(table, out_dir / "peak_memory.md")
    atomic_write_text(json.dumps({"threads": args.threads, "rows": rows}, indent=2), out_dir / "peak_memory.json")
    print("\n" + table)
    print(f"wrote {out_dir / 'peak_memory.md'} and peak_memory.json")
    if args.card:
        card = ROOT / "bundles" / args.bundle / "docs" / "README.md"
        atomic_write_text(fill(card.read_text(), table, *MARKERS), card)
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
