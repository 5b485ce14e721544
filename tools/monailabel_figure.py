#!/usr/bin/env python
"""The figure of what the MONAI Label app returns (apps/monailabel): written by its server test.

``tests/test_monailabel_app.py`` (``make test-label``) asks the running server for each task's result on the
sample studies (``tools/make_label_atlases.py``) and calls :func:`render` with the files it got back:

- top row, brain (``rem_sr``, ``brain_atlas``): the 4 mm input, rem_sr's 1 mm SR volume, and the atlas's
  Desikan-Killiany labels propagated by refdrn, over the SR volume;
- bottom row, abdomen (``abdomen_atlas``): the CT atlas with its organ labels, the MR with the atlas labels where
  they lie before registration (identity), and the MR with the labels propagated by f3rnet_ct_mri. The MR's own
  reference organ outlines are drawn in white, dashed.

Axial slices in radiological view (the patient's right on the left). Each title gives the mean Dice over the
labels against the study's reference labels.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.compare_methods import bundle_scripts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORGAN_COLOURS = {1: "tab:red", 2: "tab:blue", 3: "tab:green", 4: "tab:orange"}


def mean_dice(a: np.ndarray, b: np.ndarray, ids) -> float:
    """Mean Dice over `ids` (a label absent from both counts as 1)."""
    scores = []
    for i in ids:
        x, y = a == i, b == i
        total = x.sum() + y.sum()
        scores.append(1.0 if total == 0 else 2.0 * np.logical_and(x, y).sum() / total)
    return float(np.mean(scores))


def canonical(path: Path) -> np.ndarray:
    """The volume in RAS orientation, as an array (the view convention of ``scripts/figures.py``)."""
    return np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)


def outline(ax, labels: np.ndarray, ids, colours, style="solid", width=1.2) -> None:
    """Outlines of `ids` in a 2D display-space label map: a colour per id (dict) or one colour for all."""
    for i in ids:
        mask = (labels == i).astype(float)
        if mask.any():
            colour = colours.get(i, "yellow") if isinstance(colours, dict) else colours
            ax.contour(mask, levels=[0.5], colors=[colour], linestyles=style, linewidths=width)


def render(
    out: Path,
    brain_lr: Path,
    brain_sr: Path,
    brain_labels: Path,
    brain_reference: Path,
    brain_atlas_label: Path,
    brain_ids,
    abdomen_atlas_image: Path,
    abdomen_atlas_label: Path,
    abdomen_mr: Path,
    abdomen_labels: Path,
    abdomen_reference: Path,
) -> Path:
    """Write the 2 x 3 figure to `out` (PNG, atomically); returns `out`."""
    fm = bundle_scripts(ROOT / "bundles" / "rem_sr", "figures")

    def show(ax, volume: np.ndarray, z: int, title: str, vmax: float | None = None) -> None:
        view = fm.slice_view(volume, "axial", z)
        ax.imshow(view, cmap="gray", vmin=0, vmax=vmax if vmax is not None else np.percentile(view, 99.5))
        fm.mark_orientation(ax, "axial")
        ax.set_title(title, fontsize=9)
        ax.axis("off")

    def labels_view(volume: np.ndarray, z: int) -> np.ndarray:
        return fm.slice_view(volume, "axial", z)

    lr, sr = canonical(brain_lr), canonical(brain_sr)
    labels, reference, atlas = canonical(brain_labels), canonical(brain_reference), canonical(brain_atlas_label)
    z = int(np.argmax((reference > 0).sum(axis=(0, 1))))  # the axial slice with the most labelled brain
    factor = max(1, round(sr.shape[2] / lr.shape[2]))
    lr_big = np.repeat(np.repeat(np.repeat(lr, factor, 0), factor, 1), factor, 2)  # the 4 mm voxels, shown as such
    vmax = float(np.percentile(sr, 99.5))
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.6))
    show(axes[0, 0], lr_big, z, "brain MR input, 4 mm voxels", vmax)
    show(axes[0, 1], sr, z, "rem_sr: super-resolved, 1 mm", vmax)
    show(axes[0, 2], sr, z, "", vmax)
    overlay = np.ma.masked_equal(labels_view(labels, z), 0)
    axes[0, 2].imshow(overlay, cmap="tab20", alpha=0.45, interpolation="nearest")
    propagated_dice, identity_dice = mean_dice(labels, reference, brain_ids), mean_dice(atlas, reference, brain_ids)
    axes[0, 2].set_title(
        f"brain_atlas (refdrn): {len(brain_ids)} atlas labels propagated\n"
        f"Dice {propagated_dice:.3f} (atlas as is: {identity_dice:.3f})",
        fontsize=9,
    )

    ct, ct_label = canonical(abdomen_atlas_image), canonical(abdomen_atlas_label)
    mr, propagated, truth = canonical(abdomen_mr), canonical(abdomen_labels), canonical(abdomen_reference)
    ids = list(ORGAN_COLOURS)
    z = int(np.argmax((truth == 1).sum(axis=(0, 1))))  # the axial slice through most of the liver
    show(axes[1, 0], np.clip(ct + 200.0, 0, None), z, "abdomen atlas: CT with its organ labels", vmax=450)
    outline(axes[1, 0], labels_view(ct_label, z), ids, ORGAN_COLOURS)
    show(axes[1, 1], mr, z, f"MR + atlas labels as is: Dice {mean_dice(ct_label, truth, ids):.3f}")
    outline(axes[1, 1], labels_view(truth, z), ids, "white", "dashed", 0.8)
    outline(axes[1, 1], labels_view(ct_label, z), ids, ORGAN_COLOURS)
    show(axes[1, 2], mr, z, f"abdomen_atlas (f3rnet_ct_mri): Dice {mean_dice(propagated, truth, ids):.3f}")
    outline(axes[1, 2], labels_view(truth, z), ids, "white", "dashed", 0.8)
    outline(axes[1, 2], labels_view(propagated, z), ids, ORGAN_COLOURS)
    fig.suptitle(
        "MONAI Label app: results returned by the server. Axial slices, the patient's right on the left.\n"
        "Liver red, spleen blue, right kidney green, left kidney orange; the MR's reference outlines white, dashed.",
        fontsize=10,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    return fm.save_figure(fig, out, dpi=90)
