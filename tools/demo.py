#!/usr/bin/env python
"""`make demo`: the three bundles, each on one held-out case, with a summary table and one overview figure.

Each bundle runs its own ``configs/inference.json`` through MONAI's bundle runner with the shipped weights and its
defaults (instance optimisation included), as a user would run it, into ``<output_dir>/<bundle>/``:

- ``rem_sr`` on the ×4 held-out brain (``data/brain/datalist_lr_x4.json``): the LR input, the SR output and the HR
  reference. Its headline metric is PSNR in the brain (dB), from the bundle's own ``evaluate.json`` through
  ``tools/benchmark.py`` (the same numbers as the model card), against trilinear and cubic B-spline upsampling.
- ``refdrn`` on one ×4 brain pair (``data/brain_pairs/datalist_lr_x4.json``): REM's SR images, the DDF and the
  warped image and labels. Mean Dice over the labels against identity (and elastix when ``.venv-peers`` exists).
- ``f3rnet_ct_mri`` on one CT→MR phantom pair (``data/abdomen_phantoms/datalist_ct2mri.json``): the DDF, the warped
  CT and labels. Mean Dice over the four organs against identity (and elastix when ``.venv-peers`` exists).

Dice is measured by ``tools/benchmark.py``'s code (the bundle's ITK-convention field, MONAI ``Warp`` and
``DiceMetric``), the same for every method. The run ends with a table (``<output_dir>/summary.md``): one line per
bundle with its metric, the baselines, the bundle's wall time (the whole run of its inference.json, start-up
included) and where its outputs are; and writes ``<output_dir>/overview.png``: rem_sr's LR, SR and HR; refdrn's
fixed, moving and warped images with label contours; f3rnet_ct_mri's MR, CT and warped CT with organ contours.

Usage: python tools/demo.py [--output_dir outputs/demo] [--threads 2]
           [--sr_datalist D] [--brain_pairs_datalist D] [--phantoms_datalist D]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import benchmark  # noqa: E402
from tools.compare_methods import bundle_run_command  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402
from tools.resources import run_measured, thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def run_inference(bundle: str, out: Path, overrides: dict, threads: int) -> float:
    """The bundle's inference.json into `out`; returns the run's wall seconds.

    Raises:
        SystemExit: the run failed (the bundle's last output lines, then one line naming the bundle).
    """
    root = ROOT / "bundles" / bundle
    cmd = bundle_run_command(str(root / "configs" / "inference.json"), root, out, overrides)
    m = run_measured(cmd, env=thread_env(threads))
    if m.returncode != 0:
        raise SystemExit(f"{m.tail()}\nerror: {bundle} inference failed with exit code {m.returncode}")
    return m.seconds


def one_output(folder: Path, postfix: str) -> Path:
    found = sorted(folder.glob(f"*/*_{postfix}.nii.gz"))
    if len(found) != 1:
        raise SystemExit(f"error: expected one *_{postfix}.nii.gz under {folder}, found {len(found)}")
    return found[0]


def lr_x4_datalist(sr_datalist: Path) -> Path:
    """rem_sr's ×4 inference datalist, beside its HR datalist (``fetch_sample_data.py`` writes both)."""
    return sr_datalist.parent / "datalist_lr_x4.json"


def sr_step(args, out: Path) -> dict:
    """rem_sr inference on the ×4 test brain, then PSNR in the brain of trilinear, B-spline and REM."""
    lr_datalist = lr_x4_datalist(args.sr_datalist)
    seconds = run_inference(
        "rem_sr", out, {"datalist": str(lr_datalist), "dataset_dir": str(lr_datalist.parent)}, args.threads
    )
    bench = out / "benchmark"
    argv = ["rem_sr", "--methods", "trilinear", "bspline", "rem", "--scale", "4", "--threads", str(args.threads)]
    argv += ["--datalist", str(args.sr_datalist), "--output_dir", str(bench)]
    benchmark.main(argv)
    with open(bench / "results.csv") as f:
        psnr = {row["method"]: float(row["psnr_brain"]) for row in csv.DictReader(f)}
    return {
        "bundle": "rem_sr",
        "case": "×4 held-out brain",
        "metric": f"PSNR in the brain {psnr['rem']:.2f} dB",
        "baselines": f"trilinear {psnr['trilinear']:.2f} dB, cubic B-spline {psnr['bspline']:.2f} dB",
        "seconds": seconds,
        "outputs": out,
        "files": {"lr": one_output(out, "lr"), "sr": one_output(out, "sr"), "hr": one_output(out, "hr")},
    }


def registration_step(bundle: str, datalist: Path, case: str, args, out: Path) -> dict:
    """One registration bundle on the first test pair of `datalist`: its outputs, and Dice against identity (and
    elastix with .venv-peers)."""
    keys = ("moving_image", "fixed_image", "moving_label", "fixed_label")
    pair = benchmark.load_pairs(datalist, datalist.parent, "test", keys)[0]
    overrides = {k: pair[k] for k in ("moving_image", "fixed_image", "moving_label")}
    seconds = run_inference(bundle, out, overrides, args.threads)
    fixed_label = nib.load(pair["fixed_label"])
    affine, shape = fixed_label.affine, fixed_label.shape[:3]
    fixed_ids = np.asarray(fixed_label.dataobj).astype(np.int64)
    moving_ids = benchmark.labels_on_grid(nib.load(pair["moving_label"]), affine, shape)

    def dice_of(ddf: np.ndarray) -> float:
        return benchmark.registration_metrics(ddf, moving_ids, fixed_ids, affine, surface=False)[0]["dice"]

    field = benchmark.itk_field_to_ddf(nib.load(str(one_output(out, "ddf_itk"))), affine, shape)
    dice = {bundle: dice_of(field), "identity": dice_of(np.zeros_like(field))}
    baselines = f"identity {dice['identity']:.4f}"
    if benchmark.PEERS_PYTHON.is_file():
        work = out / "elastix"
        work.mkdir(parents=True, exist_ok=True)
        peer_pair = benchmark.upsampled_pair(pair, work)
        peer_field, _ = benchmark.run_peer_method("elastix", peer_pair, work, args.threads)
        dice["elastix"] = dice_of(benchmark.itk_field_to_ddf(nib.load(str(peer_field)), affine, shape))
        baselines += f", elastix {dice['elastix']:.4f}"
    else:
        baselines += " (elastix: `make peers-venv`)"
    files = {"fixed_label": Path(pair["fixed_label"]), "moving_label": Path(pair["moving_label"])}
    files.update({k: one_output(out, k) for k in ("warped", "warped_label")})
    if bundle == "refdrn":  # REM's SR images: what the registration saw, on the labels' grid
        files.update({"fixed": one_output(out, "sr_fixed"), "moving": one_output(out, "sr_moving")})
    else:
        files.update({"fixed": Path(pair["fixed_image"]), "moving": Path(pair["moving_image"])})
    return {
        "bundle": bundle,
        "case": case,
        "metric": f"mean Dice {dice[bundle]:.4f}",
        "baselines": baselines,
        "seconds": seconds,
        "outputs": out,
        "files": files,
    }


def ras(path: Path) -> np.ndarray:
    """A volume as a RAS array (the bundles' and the figures' orientation)."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def overview(rows: list[dict], path: Path) -> Path:
    """The demo's figure: a row per bundle, three axial panels each, in the package's view convention
    (``scripts/figures.py``: radiological, orientation letters); writes `path` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_mod = benchmark.bundle_scripts(ROOT / "bundles" / "rem_sr", "figures")
    by_bundle = {r["bundle"]: r for r in rows}
    fig, axes = plt.subplots(3, 3, figsize=(12, 12.5))

    def panel(ax, volume, z, title, labels=None, vmax=None):
        view = fig_mod.slice_view(volume, "axial", z)
        ax.imshow(view, cmap="gray", vmin=0, vmax=vmax if vmax is not None else np.percentile(view, 99.5))
        if labels is not None:
            fig_mod.draw_contours(ax, fig_mod.slice_view(labels, "axial", z), linewidth=0.7)
        fig_mod.mark_orientation(ax, "axial")
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    sr = by_bundle["rem_sr"]
    lr, hr = ras(sr["files"]["lr"]), ras(sr["files"]["hr"])
    z = hr.shape[2] // 2
    factor = max(1, round(hr.shape[2] / lr.shape[2]))
    vmax = float(np.percentile(hr, 99.5))
    # the LR input shown on the HR grid by repeating its voxels, so that its blockiness is what one sees
    lr_big = np.repeat(np.repeat(np.repeat(lr, factor, 0), factor, 1), factor, 2)[: hr.shape[0], : hr.shape[1]]
    panel(axes[0, 0], lr_big, min(z, lr_big.shape[2] - 1), "rem_sr: ×4 LR input", vmax=vmax)
    panel(axes[0, 1], ras(sr["files"]["sr"]), z, f"rem_sr: SR output ({sr['metric']})", vmax=vmax)
    panel(axes[0, 2], hr, z, "rem_sr: HR reference", vmax=vmax)

    def soft_tissue(ct: np.ndarray) -> np.ndarray:  # CT in HU: a soft-tissue window
        return np.clip(ct + 160.0, 0, 400)

    rows_spec = (
        ("refdrn", "fixed (SR)", "moving (SR)", lambda v: v),
        ("f3rnet_ct_mri", "fixed MR", "moving CT", soft_tissue),
    )
    for row, (name, fixed_title, moving_title, moving_window) in enumerate(rows_spec, start=1):
        r = by_bundle[name]
        f = r["files"]
        fixed, fixed_label = ras(f["fixed"]), ras(f["fixed_label"])
        z = int(np.argmax((fixed_label > 0).sum(axis=(0, 1))))  # the slice with the most labelled tissue
        panel(axes[row, 0], fixed, z, f"{name}: {fixed_title} + its labels", fixed_label)
        moving, warped = moving_window(ras(f["moving"])), moving_window(ras(f["warped"]))
        moving_label = ras(f["moving_label"])
        if moving_label.shape == moving.shape:
            panel(axes[row, 1], moving, z, f"{name}: {moving_title} + its labels", moving_label)
        else:
            panel(axes[row, 1], moving, z, f"{name}: {moving_title}")
        panel(axes[row, 2], warped, z, f"{name}: warped + warped labels ({r['metric']})", ras(f["warped_label"]))
    fig.suptitle(
        "make demo: each bundle's inference.json on one held-out case (axial slices, the patient's right on the "
        "left; label outlines in colour)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return fig_mod.save_figure(fig, path, dpi=80)


def table(rows: list[dict]) -> str:
    lines = [
        "| bundle | case | result | baselines | time | outputs |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = r["outputs"].relative_to(ROOT) if r["outputs"].is_relative_to(ROOT) else r["outputs"]
        lines.append(
            f"| {r['bundle']} | {r['case']} | {r['metric']} | {r['baselines']} | {r['seconds']:.0f} s | `{where}/` |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    parser.add_argument(
        "--sr_datalist",
        type=Path,
        default=DATA / "brain" / "datalist.json",
        help="rem_sr's HR datalist (its folder holds datalist_lr_x4.json too)",
    )
    parser.add_argument("--brain_pairs_datalist", type=Path, default=DATA / "brain_pairs" / "datalist_lr_x4.json")
    parser.add_argument("--phantoms_datalist", type=Path, default=DATA / "abdomen_phantoms" / "datalist_ct2mri.json")
    args = parser.parse_args(argv)
    out = args.output_dir.resolve()
    datalists = (args.sr_datalist, lr_x4_datalist(args.sr_datalist), args.brain_pairs_datalist, args.phantoms_datalist)
    for path in datalists:  # all checked before anything runs
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: run `make demo` (it builds the sample data first)")
    rows = [
        sr_step(args, out / "rem_sr"),
        registration_step("refdrn", args.brain_pairs_datalist, "one ×4 brain pair", args, out / "refdrn"),
        registration_step(
            "f3rnet_ct_mri", args.phantoms_datalist, "one CT→MR phantom pair", args, out / "f3rnet_ct_mri"
        ),
    ]
    figure = overview(rows, out / "overview.png")
    text = table(rows)
    atomic_write_text(text, out / "summary.md")
    atomic_write_text(
        json.dumps([{k: str(v) for k, v in r.items() if k != "files"} for r in rows], indent=2), out / "summary.json"
    )
    print("\n" + text)
    print(f"overview figure: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
