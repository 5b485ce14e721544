"""tools/profile_inference.py: a stage-by-stage profile of one case of a bundle's inference.json."""

from __future__ import annotations

import json

import pytest

from tests.helpers import save_nifti, synthetic_brain
from tools import profile_inference


def test_profile_times_every_stage_of_rem_sr(tmp_path):
    image, _ = synthetic_brain((12, 14, 10), seed=2)
    save_nifti(image, tmp_path / "data" / "lr.nii.gz", spacing=4.0)
    (tmp_path / "data" / "dl.json").write_text(json.dumps({"test": [{"image": "lr.nii.gz"}]}))
    out = tmp_path / "profile"
    args = ["rem_sr", "--threads", "1", "--output_dir", str(out), "--datalist", str(tmp_path / "data" / "dl.json")]
    assert profile_inference.main([*args, "--dataset_dir", str(tmp_path / "data"), "--precision", "fp32"]) == 0
    result = json.loads((out / "profile.json").read_text())
    seconds = {(s["stage"], s["step"]): s["seconds"] for s in result["steps"]}
    assert seconds[("network", "REM (all windows)")] > 0
    assert any(stage == "loading" and step.startswith("LoadImaged") for stage, step in seconds)
    assert any(stage == "writing" and step.startswith("SaveImaged") for stage, step in seconds)
    assert 0 < sum(s["seconds"] for s in result["steps"]) <= result["case_seconds"] * 1.05 + 0.05
    assert result["peak_rss_gb"] > 0.1
    table = (out / "profile.md").read_text()
    assert "| network | REM (all windows) |" in table and "--precision fp32" in table
    assert result["files"]["image"].endswith("lr.nii.gz")


def test_profile_refuses_a_case_out_of_range_and_odd_overrides(tmp_path):
    (tmp_path / "dl.json").write_text(json.dumps({"test": []}))
    with pytest.raises(SystemExit, match="has 0 case"):
        profile_inference.main(
            ["rem_sr", "--output_dir", str(tmp_path), "--datalist", str(tmp_path / "dl.json"), "--threads", "1"]
        )
    with pytest.raises(SystemExit):
        profile_inference.main(["rem_sr", "--output_dir", str(tmp_path), "--precision"])


def test_profile_has_a_row_per_instance_optimisation_level(tmp_path):
    """f3rnet_ct_mri (shipped weights) on a tiny phantom pair: IO's levels are steps of their own stage, outside
    the network's rows."""
    from tools import make_abdomen_phantoms

    data = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(data), "--n-subjects", "4", "--shape", "36", "40", "32"])
    out = tmp_path / "profile"
    args = ["f3rnet_ct_mri", "--threads", "1", "--output_dir", str(out), "--dataset_dir", str(data)]
    assert profile_inference.main([*args, "--io_iterations", "[3, 2]"]) == 0
    result = json.loads((out / "profile.json").read_text())
    seconds = {(s["stage"], s["step"]): s["seconds"] for s in result["steps"]}
    assert seconds[("instance optimisation", "level 1/4 grid")] > 0
    assert seconds[("instance optimisation", "level 1/2 grid")] > 0
    assert sum(s["seconds"] for s in result["steps"]) <= result["case_seconds"] * 1.05 + 0.05
    assert "| instance optimisation | level 1/2 grid |" in (out / "profile.md").read_text()
