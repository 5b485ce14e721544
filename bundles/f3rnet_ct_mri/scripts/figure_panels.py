"""The evaluation's figures of one registered pair: 2D panels captured once, saved, and drawn per method and across
methods.

`capture_panels` takes the first test pair of an evaluation run (RAS-oriented volumes, as the evaluation's
``Orientationd("RAS")`` leaves them) and keeps, for an axial and a coronal slice through the organs, the display
arrays of the fixed and moving images, the warped moving image, the fixed / moving / warped labels, the in-plane
DDF components and the Jacobian determinant, plus the per-organ Dice of the pair before and after registration.
`save_panels` writes them as ``figure_panels.npz`` in the run's folder (plain arrays, no pickle), `method_figure`
draws one run, `comparison_figure` draws the same pair for several runs (one per method, as
``tools/compare_methods.py`` calls it).

Every view follows the shared convention of ``figures.py`` (radiological: anterior / superior at the top, the
patient's right on the image's left), carries its edge letters (``figures.mark_orientation``) and is shown at its
physical aspect (``figures.view_aspect``). Organs are outlined in one colour each (`organ_colour`).

Paper (layout of the qualitative figure, Fig. 4): Z. Xu, J. Luo, J. Yan, X. Li, J. Jayender, "F3RNet:
Full-Resolution Residual Registration Network for Multimodal Image Registration".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import figures
from .figures import (
    EDGE_LETTERS,
    PLANES,
    ddf_view,
    draw_contours,
    draw_grid,
    mark_orientation,
    save_figure,
    slice_view,
    view_aspect,
)
from .registration_metrics import jacobian_determinant

__all__ = [
    "FIGURE_PLANES",
    "PANELS_FILE",
    "capture_panels",
    "comparison_figure",
    "dice_text",
    "load_panels",
    "method_figure",
    "organ_colour",
    "organ_slice",
    "save_panels",
]

PANELS_FILE = "figure_panels.npz"
FIGURE_PLANES = ("axial", "coronal")
# the 2D arrays kept per plane (``<plane>_<name>`` in the npz): [rows, cols] display arrays of figures.slice_view
PLANE_ARRAYS = (
    "fixed",
    "moving",
    "warped",
    "fixed_label",
    "moving_label",
    "warped_label",
    "ddf_row",
    "ddf_col",
    "jacobian",
)
# the paper's figure colours for liver (green), spleen (blue) and kidneys (red); the left kidney gets its own
ORGAN_COLOURS = {"liver": "lime", "spleen": "deepskyblue", "right kidney": "red", "left kidney": "orange"}
_FALLBACK_COLOURS = ("magenta", "yellow", "cyan", "white", "pink", "gold")
# the Jacobian map's fixed range, centred on 1 (no volume change), the same in every figure so they compare
JACOBIAN_RANGE = (0.0, 2.0)


def organ_colour(name: str, index: int = 0) -> str:
    """The contour colour of an organ: `ORGAN_COLOURS` by name, else a fallback colour picked by `index`."""
    return ORGAN_COLOURS.get(name, _FALLBACK_COLOURS[index % len(_FALLBACK_COLOURS)])


def _array(x: Any) -> np.ndarray:
    """A float64 numpy copy of a tensor / array, channel axis of size 1 dropped."""
    a = torch.as_tensor(x).as_subclass(torch.Tensor).detach().double().cpu().numpy() if torch.is_tensor(x) else x
    a = np.asarray(a, dtype=np.float64)
    return a[0] if a.ndim == 4 and a.shape[0] == 1 else a


def organ_slice(label: np.ndarray, plane: str, organ_ids: Sequence[int], min_fraction: float = 0.25) -> int:
    """The slice of `plane` that cuts the most organs, each as well as possible.

    An organ counts in a slice when its area there is at least `min_fraction` of its largest area over the
    slices of that plane (a slice grazing a kidney's pole does not count it). Among the slices that count the
    most organs, the one whose smallest relative area (area / the organ's largest area) is largest wins, so that
    no organ of the view is cut near its tip.

    Args:
        label: ``[X, Y, Z]`` label ids of a RAS volume.
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (``figures.PLANES``).
        organ_ids: the label ids of the organs.
        min_fraction: the area fraction above.

    Returns:
        The slice index along the axis that `plane` fixes; the middle slice when no organ is present.
    """
    axis = PLANES[plane][0]
    others = tuple(a for a in range(3) if a != axis)
    areas = np.stack([(label == i).sum(axis=others) for i in organ_ids]).astype(np.float64)  # [organs, slices]
    largest = areas.max(1, keepdims=True)
    if not largest.any():
        return int(label.shape[axis]) // 2
    fraction = np.divide(areas, largest, out=np.zeros_like(areas), where=largest > 0)
    counted = fraction >= min_fraction
    smallest = np.where(counted, fraction, np.inf).min(0)
    smallest[~counted.any(0)] = 0.0
    return int(np.argmax(counted.sum(0) + smallest / 2))  # the smallest fraction (<= 1) only breaks ties


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; NaN when the reference `b` is empty (MONAI ``DiceMetric(ignore_empty=True)``)."""
    if not b.any():
        return float("nan")
    return float(2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def capture_panels(
    fixed: Any,
    moving: Any,
    warped: Any,
    fixed_label: Any,
    moving_label: Any,
    warped_label: Any,
    ddf: Any,
    affine: Any,
    organs: Mapping[int, str],
    planes: Sequence[str] = FIGURE_PLANES,
) -> dict[str, np.ndarray]:
    """The 2D panels and per-organ Dice of one registered pair, as plain arrays.

    Args:
        fixed, moving, warped: ``[X, Y, Z]`` (or ``[1, X, Y, Z]``) images on the fixed grid, RAS-oriented (any
            intensity unit; the evaluation passes the network inputs, normalised to [0, 1]).
        fixed_label, moving_label, warped_label: ``[X, Y, Z]`` (or ``[1, X, Y, Z]``) label ids; ids that are not
            organs are drawn as background.
        ddf: ``[3, X, Y, Z]`` DDF in voxels of the RAS grid (MONAI ``Warp`` convention).
        affine: ``[4, 4]`` affine of the fixed grid (voxel -> RAS mm); gives the voxel spacing (mm) and must be
            RAS-oriented, so that the views' edge letters are right.
        organs: ``{label id: organ name}``, e.g. ``{1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney"}``.
        planes: the views, each through the slice that `organ_slice` picks on the fixed label.

    Returns:
        ``organ_ids`` [K] int64, ``organ_names`` [K] str, ``spacing`` [3] mm, ``planes`` [P] str, ``dice`` and
        ``dice_before`` [K] (Dice of the warped / unregistered moving label against the fixed label; NaN for an
        organ absent from the fixed label), ``folding_percent`` (percentage of the volume's voxels with
        det J <= 0), and per plane ``<plane>_index`` (the slice) and ``<plane>_<name>`` ``[rows, cols]`` display
        arrays for every name of `PLANE_ARRAYS`: images float32, labels int16, ``ddf_row``/``ddf_col`` the
        in-plane displacement in display pixels (``figures.ddf_view``), ``jacobian`` det J of ``x -> x + u(x)``.

    Raises:
        ValueError: the affine is not RAS-oriented, or the volumes' shapes differ.
    """
    import nibabel as nib

    aff = np.asarray(torch.as_tensor(affine).detach().cpu().double().numpy() if torch.is_tensor(affine) else affine)
    aff = aff[0] if aff.ndim == 3 else aff
    axcodes = "".join(nib.orientations.aff2axcodes(aff))
    if axcodes != "RAS":
        raise ValueError(f"the figure panels need RAS-oriented volumes (Orientationd('RAS')), got {axcodes}")
    images = {"fixed": _array(fixed), "moving": _array(moving), "warped": _array(warped)}
    organ_ids = sorted(int(i) for i in organs)
    labels = {
        k: np.where(np.isin(np.rint(_array(v)), organ_ids), np.rint(_array(v)), 0).astype(np.int16)
        for k, v in (("fixed_label", fixed_label), ("moving_label", moving_label), ("warped_label", warped_label))
    }
    u = _array(ddf)
    shape = images["fixed"].shape
    shapes = {k: v.shape for k, v in {**images, **labels}.items()} | {"ddf": u.shape[1:]}
    if len(shape) != 3 or any(s != shape for s in shapes.values()) or u.shape[0] != 3:
        raise ValueError(f"capture_panels needs [X, Y, Z] volumes and a [3, X, Y, Z] DDF of one shape, got {shapes}")
    jacobian = jacobian_determinant(torch.as_tensor(u)).numpy()
    out: dict[str, np.ndarray] = {
        "organ_ids": np.asarray(organ_ids, np.int64),
        "organ_names": np.asarray([str(organs[i]) for i in organ_ids]),
        "spacing": np.linalg.norm(aff[:3, :3], axis=0),
        "planes": np.asarray(list(planes)),
        "dice": np.asarray([_dice(labels["warped_label"] == i, labels["fixed_label"] == i) for i in organ_ids]),
        "dice_before": np.asarray([_dice(labels["moving_label"] == i, labels["fixed_label"] == i) for i in organ_ids]),
        "folding_percent": np.asarray(100.0 * float((jacobian <= 0).mean())),
    }
    for plane in planes:
        index = organ_slice(labels["fixed_label"], plane, organ_ids)
        out[f"{plane}_index"] = np.asarray(index, np.int64)
        for name, volume in images.items():
            out[f"{plane}_{name}"] = slice_view(volume, plane, index).astype(np.float32)
        for name, volume in labels.items():
            out[f"{plane}_{name}"] = slice_view(volume, plane, index).astype(np.int16)
        d_row, d_col = ddf_view(u, plane, index)
        out[f"{plane}_ddf_row"], out[f"{plane}_ddf_col"] = d_row.astype(np.float32), d_col.astype(np.float32)
        out[f"{plane}_jacobian"] = slice_view(jacobian, plane, index).astype(np.float32)
    return out


def save_panels(path: str | Path, panels: Mapping[str, Any]) -> Path:
    """Write `panels` (strings and arrays) as a compressed ``.npz`` atomically (``figures.save_panels``)."""
    return figures.save_panels(path, panels)


def load_panels(path: str | Path) -> dict[str, np.ndarray]:
    """Read a ``figure_panels.npz`` written by `save_panels` (no pickle).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not readable, or a key of `capture_panels`' output is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no figure panels (the evaluation's RegistrationFigure handler writes them)")
    panels = figures.load_panels(path)
    planes = [str(p) for p in panels.get("planes", [])]
    needed = ["organ_ids", "organ_names", "spacing", "planes", "dice", "dice_before", "case", "method_title"]
    needed += [f"{p}_{n}" for p in planes for n in (*PLANE_ARRAYS, "index")]
    missing = [k for k in needed if k not in panels]
    if missing:
        raise ValueError(f"{path}: not a figure-panels file, missing {', '.join(missing)}")
    return panels


def _short(name: str) -> str:
    """``right kidney`` -> ``R kidney`` for panel titles."""
    return name.replace("right ", "R ").replace("left ", "L ")


def dice_text(names: Sequence[str], values: Sequence[float], per_line: int = 2, short: bool = True) -> str:
    """Per-organ Dice as text, e.g. ``"liver 0.851  spleen 0.899\\nR kidney 0.842  L kidney 0.891"``."""
    items = [f"{_short(str(n)) if short else n} {float(v):.3f}" for n, v in zip(names, values)]
    return "\n".join("  ".join(items[i : i + per_line]) for i in range(0, len(items), per_line))


def _mean(values: Sequence[float]) -> float:
    v = np.asarray(values, np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _show(ax, image: np.ndarray, plane: str, spacing: Sequence[float], title: str, brightness: float = 1.0) -> None:
    """A grey image panel at physical aspect with its edge letters (images in [0, 1])."""
    ax.imshow(brightness * image, cmap="gray", vmin=0, vmax=1, aspect=view_aspect(spacing, plane))
    mark_orientation(ax, plane, color="yellow", fontsize=8, outline="black", outline_width=2)
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])


def _contours(ax, labels: np.ndarray, panels: Mapping[str, np.ndarray], linewidth: float = 0.8) -> None:
    """One outline per organ of a display-space label slice, in the organ's colour."""
    for k, (i, name) in enumerate(zip(panels["organ_ids"], panels["organ_names"])):
        mask = (labels == int(i)).astype(np.int16)
        if mask.any():
            draw_contours(ax, mask, color=organ_colour(str(name), k), linewidth=linewidth)


def _grid(ax, panels: Mapping[str, np.ndarray], plane: str, title: str) -> None:
    """The fixed grid mapped into the moving image (``figures.draw_grid``) over the dimmed moving image."""
    spacing = panels["spacing"]
    _show(ax, panels[f"{plane}_moving"], plane, spacing, title, brightness=0.45)
    d_row, d_col = panels[f"{plane}_ddf_row"], panels[f"{plane}_ddf_col"]
    draw_grid(ax, d_row, d_col, step=max(4, int(round(max(d_row.shape) / 24))), color="yellow", linewidth=0.45)
    ax.set_aspect(view_aspect(spacing, plane))


def _jacobian(ax, panels: Mapping[str, np.ndarray], plane: str, title: str):
    """The det J map: diverging colours centred on 1 over `JACOBIAN_RANGE`, det J <= 0 in black; returns the image."""
    import matplotlib.colors as mcolors

    jac = panels[f"{plane}_jacobian"]
    lo, hi = JACOBIAN_RANGE
    image = ax.imshow(
        jac,
        cmap="RdBu_r",
        norm=mcolors.TwoSlopeNorm(vmin=lo, vcenter=1.0, vmax=hi),
        aspect=view_aspect(panels["spacing"], plane),
        interpolation="nearest",
    )
    folded = jac <= 0
    if folded.any():
        ax.imshow(
            np.ma.masked_where(~folded, np.ones_like(jac)),
            cmap=mcolors.ListedColormap(["black"]),
            aspect=view_aspect(panels["spacing"], plane),
            interpolation="nearest",
        )
    mark_orientation(ax, plane, color="black", fontsize=8, outline="white", outline_width=2)
    ax.set_title(f"{title}\ndet J {jac.min():.2f}..{jac.max():.2f}; det J<=0: {int(folded.sum())} px", fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    return image


def _colourbar(fig, image, ax) -> None:
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.02, extend="both")
    bar.set_label("det J (black: <= 0)", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def _legend(target, panels: Mapping[str, np.ndarray], y: float = 0.0) -> None:
    """A legend naming each organ's contour colour: below a figure, or inside an (empty) axes."""
    from matplotlib.lines import Line2D

    names = [str(n) for n in panels["organ_names"]]
    handles = [Line2D([0], [0], color=organ_colour(n, k), linewidth=2) for k, n in enumerate(names)]
    texts = [f"{n} ({int(i)})" for n, i in zip(names, panels["organ_ids"])]
    title = "organ contours (label id);\nleft / right = the patient's"
    if hasattr(target, "legends"):  # a figure: one row below the panels
        place = {"loc": "lower center", "bbox_to_anchor": (0.5, y), "ncol": len(names)}
        title = title.replace("\n", " ")
    else:
        place = {"loc": "upper left"}
    legend = target.legend(handles, texts, fontsize=7.5, frameon=False, title=title, title_fontsize=7.5, **place)
    legend.set_in_layout(False)


def _plane_label(panels: Mapping[str, np.ndarray], plane: str) -> str:
    axis = "xyz"[PLANES[plane][0]]
    left, right, top, bottom = EDGE_LETTERS[plane]
    return f"{plane} {axis}={int(panels[f'{plane}_index'])} ({top} up, patient's {left} on image left)"


def method_figure(panels: Mapping[str, np.ndarray], path: str | Path, dpi: int = 110) -> Path:
    """One method's figure of the pair in `panels` (from `capture_panels`, plus ``case``, ``method_title``,
    ``fixed_modality``, ``moving_modality``), written atomically as a PNG.

    One row per plane; columns: the fixed image with the fixed organ contours, the moving image with the moving
    contours, the warped moving image under the fixed contours, the deformation grid, the Jacobian-determinant
    map. Titles give the per-organ Dice before (moving) and after (warped) registration. Images are drawn on
    [0, 1] (the evaluation's normalised intensities).

    Returns:
        `path`.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planes = [str(p) for p in panels["planes"]]
    names = [str(n) for n in panels["organ_names"]]
    title, fixed_mod, moving_mod = (str(panels[k]) for k in ("method_title", "fixed_modality", "moving_modality"))
    fig, axes = plt.subplots(len(planes), 5, figsize=(15.5, 3.5 * len(planes) + 0.9), squeeze=False)
    for row, plane in zip(axes, planes):
        spacing = panels["spacing"]
        _show(row[0], panels[f"{plane}_fixed"], plane, spacing, f"fixed ({fixed_mod})\n{_plane_label(panels, plane)}")
        _contours(row[0], panels[f"{plane}_fixed_label"], panels)
        before = dice_text(names, panels["dice_before"])
        text = f"moving ({moving_mod}), moving contours\nno registration: Dice {before}"
        _show(row[1], panels[f"{plane}_moving"], plane, spacing, text)
        _contours(row[1], panels[f"{plane}_moving_label"], panels)
        after = dice_text(names, panels["dice"])
        _show(row[2], panels[f"{plane}_warped"], plane, spacing, f"warped moving, fixed contours\nDice {after}")
        _contours(row[2], panels[f"{plane}_fixed_label"], panels)
        _grid(row[3], panels, plane, "deformation grid\n(fixed grid in the moving image)")
        _colourbar(fig, _jacobian(row[4], panels, plane, "Jacobian determinant"), row[4])
    dice_all = dice_text(names, panels["dice"], per_line=len(names), short=False)
    fig.suptitle(
        f"{panels['case']}: {moving_mod} -> {fixed_mod}, {title}. Dice per organ: {dice_all}  "
        f"(mean {_mean(panels['dice']):.3f}; before registration {_mean(panels['dice_before']):.3f})",
        fontsize=8.5,
    )
    _legend(fig, panels)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return save_figure(fig, path, dpi=dpi)


def comparison_figure(runs: Mapping[str, str | Path], path: str | Path, dpi: int = 120) -> Path | None:
    """The same pair across methods, from each evaluation run's ``figure_panels.npz``, as one PNG.

    Per plane, three rows: the fixed image (fixed contours), the moving image (moving contours) and each
    method's warped image (fixed contours, the method's per-organ Dice in its title); each method's deformation
    grid; each method's Jacobian-determinant map. A table of the per-organ Dice per method and the organ legend
    fill the cells under the fixed and moving images. ``tools/compare_methods.py`` calls it once per grid point.

    Args:
        runs: method name -> that method's evaluation run folder (holding ``figure_panels.npz``), in column order.
        path: the PNG to write.
        dpi: resolution.

    Returns:
        `path`, or None when `runs` is empty.

    Raises:
        FileNotFoundError: a run folder has no ``figure_panels.npz``.
        ValueError: the runs show different cases or slices (not the same pair).
    """
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = {m: load_panels(Path(folder) / PANELS_FILE) for m, folder in runs.items()}
    methods = list(loaded)
    ref = loaded[methods[0]]
    planes = [str(p) for p in ref["planes"]]
    for m, p in loaded.items():
        same = str(p["case"]) == str(ref["case"]) and [str(x) for x in p["planes"]] == planes
        same = same and all(int(p[f"{pl}_index"]) == int(ref[f"{pl}_index"]) for pl in planes)
        same = same and all(p[f"{pl}_fixed"].shape == ref[f"{pl}_fixed"].shape for pl in planes)
        if not same:
            raise ValueError(
                f"{runs[m]}: figure panels of case {p['case']} do not show the pair and slices of "
                f"{runs[methods[0]]} (case {ref['case']}): compare runs on the same test data"
            )
    names = [str(n) for n in ref["organ_names"]]
    fixed_mod, moving_mod = str(ref["fixed_modality"]), str(ref["moving_modality"])
    ncols, nrows = 2 + len(methods), 3 * len(planes)
    heights = []
    for plane in planes:
        rows, cols = ref[f"{plane}_fixed"].shape
        heights += 3 * [2.3 * rows * float(view_aspect(ref["spacing"], plane)) / cols + 0.6]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(2.9 * ncols + 0.5, sum(heights) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for b, plane in enumerate(planes):
        img, grid, jac = axes[3 * b], axes[3 * b + 1], axes[3 * b + 2]
        spacing = ref["spacing"]
        _show(img[0], ref[f"{plane}_fixed"], plane, spacing, f"fixed ({fixed_mod})\n{_plane_label(ref, plane)}")
        _contours(img[0], ref[f"{plane}_fixed_label"], ref)
        _show(img[1], ref[f"{plane}_moving"], plane, spacing, f"moving ({moving_mod})\nmoving contours")
        _contours(img[1], ref[f"{plane}_moving_label"], ref)
        for c, m in enumerate(methods, start=2):
            p = loaded[m]
            title = f"{m}: {p['method_title']}, warped\nDice {dice_text(names, p['dice'])}"
            _show(img[c], p[f"{plane}_warped"], plane, spacing, title)
            _contours(img[c], ref[f"{plane}_fixed_label"], ref)
            _grid(grid[c], p, plane, f"{m}: deformation grid\n({plane})")
            image = _jacobian(jac[c], p, plane, f"{m}: Jacobian determinant ({plane})")
            _colourbar(fig, image, jac[c])
        for ax in (*grid[:2], *jac[:2]):
            ax.axis("off")
        if b == 0:
            lines = [f"{'':<16}" + "".join(f"{_short(n):>10}" for n in names) + f"{'mean':>8}"]
            table = [("no registration", ref["dice_before"])] + [(m, loaded[m]["dice"]) for m in methods]
            for m, values in table:
                lines.append(f"{m:<16}" + "".join(f"{float(v):>10.3f}" for v in values) + f"{_mean(values):>8.3f}")
            table_text = grid[0].text(
                0.0,
                0.9,
                f"Dice per organ, {ref['case']}, whole volume\n(fixed labels vs warped moving labels)\n\n"
                + "\n".join(lines),
                family="monospace",
                fontsize=7.5,
                va="top",
                transform=grid[0].transAxes,
            )
            table_text.set_in_layout(False)  # it spans the two empty cells; the layout keeps to the panels
            _legend(jac[0], ref)
    fig.suptitle(
        f"{ref['case']}: {moving_mod} -> {fixed_mod}, the same pair and slices for every method "
        f"({', '.join(methods)}); contours: fixed labels on fixed and warped, moving labels on moving",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.985), h_pad=0.8)
    return save_figure(fig, path, dpi=dpi)
