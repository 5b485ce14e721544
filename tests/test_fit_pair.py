"""tools/fit_pair.py: instance optimisation with a bundle's own loss recovers a known shift."""

import json
import re

import numpy as np
import pytest

from tests.helpers import save_nifti, synthetic_brain
from tools import fit_pair


def shifted_pair(root, shift=3):
    image, mask = synthetic_brain((40, 48, 40), seed=3)
    labels = (mask * (1 + (image > 0.6))).astype(np.uint8)  # two labels
    save_nifti(image, root / "fixed.nii.gz")
    save_nifti(labels, root / "fixed_label.nii.gz")
    save_nifti(np.roll(image, shift, axis=0), root / "moving.nii.gz")
    save_nifti(np.roll(labels, shift, axis=0), root / "moving_label.nii.gz")
    item = {
        "name": "shift",
        "fixed_image": "fixed.nii.gz",
        "moving_image": "moving.nii.gz",
        "fixed_label": "fixed_label.nii.gz",
        "moving_label": "moving_label.nii.gz",
    }
    (root / "datalist.json").write_text(json.dumps({"training": [item], "validation": [{"name": "x"}]}))
    return root / "datalist.json"


def test_refdrn_loss_recovers_a_known_shift(tmp_path, capsys):
    datalist = shifted_pair(tmp_path)
    assert (
        fit_pair.main(
            [
                "--bundle",
                "refdrn",
                "--datalist",
                str(datalist),
                "--scale",
                "2",
                "--downsample",
                "1",
                "--grid",
                "4",
                "--iterations",
                "40",
                "--lr",
                "0.3",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    identity = float(re.search(r"identity Dice ([0-9.]+)", out).group(1))
    final = float(re.findall(r"Dice ([0-9.]+)", out)[-1])
    assert final > identity + 0.1, out


def test_fit_pair_rejects_unlabelled_pairs_and_bad_index(tmp_path):
    datalist = shifted_pair(tmp_path)
    with pytest.raises(SystemExit):
        fit_pair.main(["--bundle", "refdrn", "--datalist", str(datalist), "--section", "validation"])
    with pytest.raises(SystemExit):
        fit_pair.main(["--bundle", "refdrn", "--datalist", str(datalist), "--index", "5"])
