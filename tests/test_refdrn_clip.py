"""Issue 14: refdrn's inference clips each saved image to its own input's intensity range (``clip_output``).

REM overshoots at edges (ringing), so for a pair in 200..3200 the SR and warped images came out in -295..3478. By
default ``_sr_moving`` and ``_warped`` are clipped to [min, max] of the moving input and ``_sr_fixed`` to that of the
fixed input (``scripts.intensity.ClipToInputRanged``); ``--clip_output false`` keeps the raw network output. Labels and
the DDF are never clipped. Run through ``python -m monai.bundle run`` with the real frozen REM and random tiny
backbone weights on a 16^3 LR pair (x4: a 64^3 grid).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, run_bundle, synthetic_labels
from tests.user_files import HR_AFFINE, LR_AFFINE

TINY_NET = {"fdrn_channels": [4, 8, 8], "fdrn_num_res": 1}
# scanner-like ranges, different per image so that clipping with the other image's range would be seen
RANGES = {"moving": (200.0, 3200.0), "fixed": (100.0, 1600.0)}
IMAGES = ("sr_moving", "sr_fixed", "warped")
REFERENCE = {"sr_moving": "moving", "warped": "moving", "sr_fixed": "fixed"}


def _save(array: np.ndarray, path: Path, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same pair run with the default (clipped) and with ``--clip_output false`` (raw)."""
    root = tmp_path_factory.mktemp("refdrn_clip")
    files = {}
    for role, seed in (("moving", 3), ("fixed", 4)):
        image, labels = synthetic_labels((64, 64, 64), seed=seed)
        lr = image.reshape(16, 4, 16, 4, 16, 4).mean((1, 3, 5))
        low, high = RANGES[role]
        lr = low + (high - low) * (lr - lr.min()) / (lr.max() - lr.min())  # exactly low..high
        files[f"{role}_image"] = _save(lr.astype(np.float32), root / f"{role}_lr.nii.gz", LR_AFFINE)
        files[f"{role}_label"] = _save(labels, root / f"{role}_labels.nii.gz", HR_AFFINE)
    networks = load_bundle_scripts("refdrn", "networks")
    torch.manual_seed(0)
    state = networks.build_registration_network(rem=None, **TINY_NET).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("backbone.")}, root / "model.pt")
    outputs = {}
    for tag, extra in (("clipped", {}), ("raw", {"clip_output": "false"})):
        out = root / tag
        run_bundle(
            "refdrn",
            ["inference.json"],
            {
                **TINY_NET,
                **extra,
                "ckpt_path": str(root / "model.pt"),
                "output_dir": str(out),
                "moving_image": files["moving_image"],
                "fixed_image": files["fixed_image"],
                "moving_label": files["moving_label"],
                "datalist": str(root / "missing.json"),
                # the random tiny backbone's near-zero field: warping and clipping commute, so `_warped` of the
                # clipped run is the raw `_warped` clipped (instance optimisation would move the edges)
                "io_iterations": 0,
            },
        )
        case = out / "moving_lr"
        outputs[tag] = {
            key: np.asarray(nib.load(str(case / f"moving_lr_{key}.nii.gz")).dataobj)
            for key in (*IMAGES, "ddf", "warped_label")
        }
    return outputs


def test_default_clips_each_image_to_its_own_input_range(runs):
    for key in IMAGES:
        low, high = RANGES[REFERENCE[key]]
        clipped, raw = runs["clipped"][key], runs["raw"][key]
        assert clipped.min() >= low - 1e-3 and clipped.max() <= high + 1e-3, (key, clipped.min(), clipped.max())
        # exactly the raw output clipped to that range (so not to the other image's range, nor rescaled)
        np.testing.assert_allclose(clipped, np.clip(raw, low, high), rtol=0, atol=1e-3 * high)


def test_clip_output_false_keeps_the_raw_output(runs):
    """The issue's example: REM's ringing takes the raw SR images outside their input's range."""
    for key in ("sr_moving", "sr_fixed"):
        low, high = RANGES[REFERENCE[key]]
        raw = runs["raw"][key]
        assert raw.min() < low - 1 or raw.max() > high + 1, (key, raw.min(), raw.max())
    assert any(not np.array_equal(runs["raw"][k], runs["clipped"][k]) for k in IMAGES)


def test_labels_and_ddf_are_never_clipped(runs):
    np.testing.assert_array_equal(runs["raw"]["ddf"], runs["clipped"]["ddf"])
    np.testing.assert_array_equal(runs["raw"]["warped_label"], runs["clipped"]["warped_label"])
    assert runs["clipped"]["warped_label"].max() == 4  # label ids, not intensities
