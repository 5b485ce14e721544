"""tools/demo.py (`make demo`) end to end on tiny data: the three bundles' inference.json, the summary table and the
overview figure."""

import json
import sys
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from tests.helpers import make_pair_dataset, save_nifti, synthetic_brain
from tools import benchmark, demo
from tools import make_abdomen_phantoms as phantoms
from tools.fetch_sample_data import make_low_resolution


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_data")
    brain = root / "brain"
    image, mask = synthetic_brain((48, 48, 40), seed=3)
    save_nifti(image, brain / "syn_T1w.nii.gz", origin=(-24.0, -24.0, -20.0))
    save_nifti(mask, brain / "syn_mask.nii.gz", origin=(-24.0, -24.0, -20.0))
    item = {"name": "syn", "image": "syn_T1w.nii.gz", "mask": "syn_mask.nii.gz"}
    (brain / "datalist.json").write_text(json.dumps({"training": [item], "test": [item]}))
    lr = make_low_resolution(nib.load(str(brain / "syn_T1w.nii.gz")), 4)
    nib.save(lr, str(brain / "syn_T1w_lr4.nii.gz"))
    lr_item = {"name": "syn", "image": "syn_T1w_lr4.nii.gz", "reference": "syn_T1w.nii.gz", "mask": "syn_mask.nii.gz"}
    (brain / "datalist_lr_x4.json").write_text(json.dumps({"test": [lr_item]}))

    pairs = make_pair_dataset(root / "pairs")
    pair = {"name": "sub3_to_sub2", "moving_label": "sub3_labels.nii.gz", "fixed_label": "sub2_labels.nii.gz"}
    for role, sub in (("moving_image", 3), ("fixed_image", 2)):
        lr = make_low_resolution(nib.load(str(pairs / f"sub{sub}_T1w.nii.gz")), 4)
        nib.save(lr, str(pairs / f"lr4_sub{sub}.nii.gz"))
        pair[role] = f"lr4_sub{sub}.nii.gz"
    (pairs / "datalist_lr_x4.json").write_text(json.dumps({"test": [pair]}))

    abdomen = root / "phantoms"
    assert phantoms.main(["--out", str(abdomen), "--n-subjects", "3", "--shape", "48", "48", "40"]) == 0
    return brain, pairs, abdomen


def test_demo_runs_every_bundle_and_writes_the_table_and_the_figure(tiny, tmp_path, monkeypatch, capsys):
    brain, pairs, abdomen = tiny
    # elastix from this environment's itk-elastix (requirements-dev.txt) stands in for .venv-peers
    monkeypatch.setattr(benchmark, "PEERS_PYTHON", Path(sys.executable))
    out = tmp_path / "demo"
    argv = ["--output_dir", str(out), "--threads", "1", "--sr_datalist", str(brain / "datalist.json")]
    argv += ["--brain_pairs_datalist", str(pairs / "datalist_lr_x4.json")]
    argv += ["--phantoms_datalist", str(abdomen / "datalist_ct2mri.json")]
    assert demo.main(argv) == 0
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    assert summary in printed  # the table is the run's last output, before the figure's path
    lines = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| bundle")]
    assert [line.split("|")[1].strip() for line in lines] == ["rem_sr", "refdrn", "f3rnet_ct_mri"]
    assert "PSNR in the brain" in lines[0] and "trilinear" in lines[0] and "B-spline" in lines[0]
    for line in lines[1:]:
        assert "mean Dice" in line and "identity" in line and "elastix" in line
    rows = json.loads((out / "summary.json").read_text())
    assert [r["bundle"] for r in rows] == ["rem_sr", "refdrn", "f3rnet_ct_mri"]
    # each bundle's outputs are kept where the table says
    assert list((out / "rem_sr").glob("*/*_sr.nii.gz")) and list((out / "refdrn").glob("*/*_warped_label.nii.gz"))
    assert list((out / "f3rnet_ct_mri").glob("*/*_ddf.nii.gz"))
    figure = out / "overview.png"
    assert figure.stat().st_size > 50_000
    assert matplotlib.image.imread(str(figure)).shape[:2] == (1000, 960)  # 3 x 3 panels, 12 x 12.5 in at 80 dpi


def test_missing_datalist_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="nope.json not found: run `make demo`"):
        demo.main(["--output_dir", str(tmp_path), "--sr_datalist", str(tmp_path / "nope.json")])
    assert not any(tmp_path.iterdir())


def test_dice_only_metrics_match_the_full_ones():
    rng = np.random.default_rng(0)
    fixed = np.zeros((16, 16, 16), np.int64)
    fixed[4:12, 4:12, 4:12] = 1
    fixed[6:9, 6:9, 6:9] = 2
    moving = np.roll(fixed, 1, axis=0)
    ddf = rng.normal(0, 0.2, (3, 16, 16, 16)).astype(np.float32)
    full, _ = benchmark.registration_metrics(ddf, moving, fixed, np.eye(4))
    fast, _ = benchmark.registration_metrics(ddf, moving, fixed, np.eye(4), surface=False)
    assert fast["dice"] == full["dice"] and np.isnan(fast["hd95"]) and np.isfinite(full["hd95"])
