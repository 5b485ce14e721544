"""tools/peak_memory.py: inference peak RSS per volume size, and the card block it fills."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tools import peak_memory
from tools.fill_model_card import fill


def test_inputs_have_the_documented_grids(tmp_path):
    rem = peak_memory.write_inputs("rem_sr", 32, tmp_path / "rem")
    img = nib.load(rem["image"])
    assert img.shape == (8, 8, 8) and np.allclose(img.header.get_zooms(), 4.0)
    f3 = peak_memory.write_inputs("f3rnet_ct_mri", 32, tmp_path / "f3")
    ct = np.asarray(nib.load(f3["moving_image"]).dataobj)
    assert ct.shape == (32, 32, 32) and ct.min() == -1000 and 0 < np.median(ct[ct > -1000]) < 200  # HU
    with pytest.raises(SystemExit, match="multiples of 4"):
        peak_memory.write_inputs("refdrn", 30, tmp_path / "bad")


def test_measures_f3rnet_inference_and_fits_a_line(tmp_path):
    assert (
        peak_memory.main(["f3rnet_ct_mri", "--sizes", "32", "48", "--threads", "1", "--output_dir", str(tmp_path)]) == 0
    )
    rows = json.loads((tmp_path / "peak_memory.json").read_text())["rows"]
    assert [r["size"] for r in rows] == [32, 48]
    assert all(2e8 < r["peak_rss_bytes"] < 8e9 and r["seconds"] > 0 for r in rows)  # a real torch process
    table = (tmp_path / "peak_memory.md").read_text()
    assert "| 48³ | 0.11 M |" in table and "Least-squares fit" in table
    assert "python tools/peak_memory.py f3rnet_ct_mri --sizes 32 48 --threads 1" in table


def test_fill_replaces_only_the_named_block():
    card = "a\n<!-- memory:start -->\nold\n<!-- memory:end -->\nb <!-- results:start -->x<!-- results:end -->"
    out = fill(card, "new", *peak_memory.MARKERS)
    assert "new" in out and "old" not in out and "<!-- results:start -->x" in out
    with pytest.raises(SystemExit, match="no <!-- results:start -->"):
        fill("no markers", "x")
