"""Figure helpers shared by the bundles: one view convention, orientation marks, contours, grids, PNG writing.

Deliberate identical copy in every bundle's ``scripts/`` (source: ``rem_sr``; ``tools/sync_common.py`` re-syncs,
``tests/test_common_copies.py`` guards), so that every figure of the package reads the same way.

View convention (radiological, as clinical viewers show it). Volumes are RAS-oriented arrays ``[X, Y, Z]``
(x towards the patient's Right, y Anterior, z Superior; the bundles reorient inputs with ``Orientationd("RAS")``):

- axial (z fixed): anterior at the top, the patient's right on the image's left;
- coronal (y fixed): superior at the top, the patient's right on the image's left;
- sagittal (x fixed): superior at the top, anterior on the image's left.

Every view is ``plane_array.T[::-1, ::-1]`` (the in-plane array transposed, then turned by 180 degrees), and
:func:`mark_orientation` writes the four edge letters (A/P, R/L, S/I) into the panel.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .common import atomic_write_bytes

# plane -> (fixed axis, column axis, row axis) of a RAS array
PLANES: dict[str, tuple[int, int, int]] = {"axial": (2, 0, 1), "coronal": (1, 0, 2), "sagittal": (0, 1, 2)}
# plane -> edge letters (left, right, top, bottom) of the displayed view
EDGE_LETTERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}


def _plane(plane: str) -> tuple[int, int, int]:
    if plane not in PLANES:
        raise ValueError(f"plane must be one of {sorted(PLANES)}, got {plane!r}")
    return PLANES[plane]


def middle_index(shape: Sequence[int], plane: str) -> int:
    """The middle slice index along the axis that `plane` fixes."""
    return int(shape[_plane(plane)[0]]) // 2


def slice_view(volume: np.ndarray, plane: str = "axial", index: int | None = None) -> np.ndarray:
    """The 2D display array of one slice of a RAS volume, in the module's view convention.

    Args:
        volume: ``[X, Y, Z]`` array in RAS orientation (a leading channel axis of size 1 is dropped).
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        index: the slice along the fixed axis; the middle slice when None.

    Returns:
        ``[rows, cols]`` array for ``imshow(origin="upper")``.

    Raises:
        ValueError: unknown plane, or a volume that is not 3D.
    """
    v = np.asarray(volume)
    if v.ndim == 4 and v.shape[0] == 1:
        v = v[0]
    if v.ndim != 3:
        raise ValueError(f"slice_view needs a 3D [X, Y, Z] volume, got shape {v.shape}")
    fixed, _, _ = _plane(plane)
    index = middle_index(v.shape, plane) if index is None else int(index)
    return np.take(v, index, axis=fixed).T[::-1, ::-1]


def view_aspect(spacing: Sequence[float] | None, plane: str = "axial") -> float:
    """``imshow`` aspect (row mm / column mm) so that anisotropic voxels are shown at their physical size."""
    if spacing is None:
        return 1.0
    _, col, row = _plane(plane)
    return float(spacing[row]) / float(spacing[col])


def ddf_view(ddf: np.ndarray, plane: str = "axial", index: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The in-plane components of a DDF slice, in display coordinates.

    Args:
        ddf: ``[3, X, Y, Z]`` displacement in voxels of a RAS grid (channel c moves along array axis c, MONAI
            ``Warp`` convention).
        plane, index: as in :func:`slice_view`.

    Returns:
        ``(d_row, d_col)``: ``[rows, cols]`` arrays, the displacement of each displayed pixel in display rows
        and columns (positive = down and right). Both view axes are reversed, hence the sign flips.
    """
    d = np.asarray(ddf)
    if d.ndim != 4 or d.shape[0] != 3:
        raise ValueError(f"ddf_view needs a [3, X, Y, Z] DDF, got shape {d.shape}")
    _, col, row = _plane(plane)
    return -slice_view(d[row], plane, index), -slice_view(d[col], plane, index)


def mark_orientation(
    ax,
    plane: str = "axial",
    color: str = "yellow",
    fontsize: float = 7,
    outline: str = "black",
    outline_width: float = 1.5,
) -> None:
    """Write the edge letters of `plane` (e.g. R/L/A/P for axial) inside the four edges of `ax`'s panel.

    The letters have an `outline` (e.g. black around yellow on images, white around black on a white map), so
    that they stay readable on bright and dark tissue alike.
    """
    from matplotlib import patheffects

    _plane(plane)
    left, right, top, bottom = EDGE_LETTERS[plane]
    effects = [patheffects.withStroke(linewidth=outline_width, foreground=outline)]
    style = dict(color=color, fontsize=fontsize, fontweight="bold", transform=ax.transAxes, path_effects=effects)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)


def draw_contours(ax, labels: np.ndarray, color=None, linewidth: float = 0.6, cmap: str = "tab20") -> None:
    """Draw the outline of every label id > 0 of a 2D display-space label map on `ax`.

    Args:
        labels: ``[rows, cols]`` integer label map (e.g. ``slice_view`` of a label volume).
        color: one colour for every label; None gives each id its own colour from `cmap`, keyed on the id, so
            that a label has the same colour in every panel.
    """
    import matplotlib

    lab = np.rint(np.asarray(labels)).astype(np.int64)
    ids = [int(i) for i in np.unique(lab) if i > 0]
    colors = matplotlib.colormaps[cmap]
    for i in ids:
        mask = (lab == i).astype(float)
        if mask.all():
            continue
        ax.contour(mask, levels=[0.5], colors=[color or colors(i % colors.N)], linewidths=linewidth)


def draw_grid(
    ax, d_row: np.ndarray, d_col: np.ndarray, step: int = 6, color: str = "tab:green", linewidth: float = 0.5
) -> None:
    """Draw a regular grid of display pixels moved by ``(d_row, d_col)`` (from :func:`ddf_view`) on `ax`.

    The grid lines pass through every `step`-th row and column; each point ``p`` is drawn at ``p + u(p)``, the
    fixed-grid point's position in the moving image, as ``Warp`` samples it.
    """
    rows, cols = d_row.shape
    r, c = np.mgrid[0:rows, 0:cols].astype(float)
    y, x = r + d_row, c + d_col
    for i in range(0, rows, step):
        ax.plot(x[i, :], y[i, :], "-", color=color, linewidth=linewidth)
    for j in range(0, cols, step):
        ax.plot(x[:, j], y[:, j], "-", color=color, linewidth=linewidth)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)


def save_panels(path: str | Path, panels: Mapping) -> Path:
    """Write a figure's panels (name -> array, number or string) as a compressed ``.npz`` atomically (no pickled
    objects); returns the path. Each bundle's evaluation leaves its figure's panels this way (``figure_panels.npz``)
    for ``comparison_figure``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in panels.items()})
    return atomic_write_bytes(path, buffer.getvalue())


def load_panels(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` written by :func:`save_panels` (strings come back as 0-d unicode arrays).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a readable ``.npz`` without pickled objects.
    """
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise
    except Exception as e:  # numpy raises several types for a damaged archive
        raise ValueError(f"{path}: not a readable figure-panels archive ({e})") from None


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write `fig` as a PNG atomically (never a half-written file) and close it; returns the path."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())
