"""The shared figure view convention (scripts/figures.py): radiological views with correct edge letters."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundles" / "rem_sr"))
figures = importlib.import_module("scripts.figures")


def _marked_volume():
    v = np.zeros((10, 12, 14))
    v[9, 6, 7] = 1.0  # most Right
    v[5, 11, 7] = 2.0  # most Anterior
    v[5, 6, 13] = 3.0  # most Superior
    return v


def _where(view, value):
    r, c = np.argwhere(view == value)[0]
    return r, c


def test_axial_view_puts_anterior_on_top_and_right_on_the_left():
    view = figures.slice_view(_marked_volume(), "axial", 7)
    assert view.shape == (12, 10)  # rows = y, cols = x
    assert _where(view, 1.0)[1] == 0  # Right -> first column (image left), as the "R" mark says
    assert _where(view, 2.0)[0] == 0  # Anterior -> top row
    assert figures.EDGE_LETTERS["axial"] == ("R", "L", "A", "P")


def test_coronal_and_sagittal_views_put_superior_on_top():
    v = _marked_volume()
    coronal = figures.slice_view(v, "coronal", 6)
    assert coronal.shape == (14, 10)
    assert _where(coronal, 3.0)[0] == 0 and _where(coronal, 1.0)[1] == 0
    sagittal = figures.slice_view(v, "sagittal", 5)
    assert sagittal.shape == (14, 12)
    assert _where(sagittal, 3.0)[0] == 0 and _where(sagittal, 2.0)[1] == 0  # Anterior on the left


def test_ddf_view_signs_follow_the_view():
    ddf = np.zeros((3, 10, 12, 14))
    ddf[0] = 2.0  # towards Right -> towards the image's left: negative columns
    ddf[1] = 1.0  # towards Anterior -> up: negative rows
    d_row, d_col = figures.ddf_view(ddf, "axial", 7)
    assert np.all(d_col == -2.0) and np.all(d_row == -1.0)
    d_row, d_col = figures.ddf_view(ddf, "sagittal", 5)
    assert np.all(d_col == -1.0) and np.all(d_row == 0.0)


def test_view_aspect_and_bad_input():
    assert figures.view_aspect((1.0, 1.0, 4.0), "coronal") == 4.0
    assert figures.view_aspect((1.0, 2.0, 4.0), "axial") == 2.0
    with pytest.raises(ValueError, match="plane"):
        figures.slice_view(np.zeros((2, 2, 2)), "oblique")
    with pytest.raises(ValueError, match="3D"):
        figures.slice_view(np.zeros((2, 2)), "axial")


def test_save_figure_writes_a_png_with_marks_contours_and_grid(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = np.zeros((20, 20), int)
    labels[5:12, 5:12] = 3
    fig, ax = plt.subplots()
    ax.imshow(np.random.default_rng(0).random((20, 20)), cmap="gray")
    figures.mark_orientation(ax, "axial")
    figures.draw_contours(ax, labels)
    figures.draw_grid(ax, np.zeros((20, 20)), np.ones((20, 20)), step=5)
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == ["A", "L", "P", "R"]
    path = figures.save_figure(fig, tmp_path / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
