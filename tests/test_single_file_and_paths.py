"""Issue 14, "Commands that take files": rem_sr's ``--image``, refdrn's ``--moving_image/--fixed_image``, the
output paths every inference prints, refdrn's progress bar, and rem_sr's SR clipped to the input's range
(``clip_output``)."""

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, make_pair_dataset, run_bundle

REM_NET = {"rem_k": 4, "rem_n": 2}
REFDRN_NET = {"fdrn_channels": [4, 8, 8], "fdrn_num_res": 1}
LINE = re.compile(r"^(\S+): (/.+)$")


def printed_cases(stdout: str) -> dict[str, list[str]]:
    """``{case: [file, ...]}`` from the ``<case>: <file>, <file>`` lines of a run."""
    cases = {}
    for line in stdout.splitlines():
        match = LINE.match(line.strip())
        if match:
            cases[match.group(1)] = match.group(2).split(", ")
    return cases


def assert_paths_printed(stdout: str, output_dir: Path, cases: list[str]) -> dict[str, list[str]]:
    """Each case has one line listing exactly the files of its output folder, all existing."""
    printed = printed_cases(stdout)
    assert sorted(printed) == sorted(cases), stdout[-3000:]
    for case, files in printed.items():
        assert all(Path(f).is_file() for f in files), files
        on_disk = sorted(str(p.resolve()) for p in (output_dir / case).iterdir() if p.is_file())
        assert sorted(files) == on_disk, (files, on_disk)
    return printed


# ------------------------------------------------------------------------------------------------------ rem_sr
@pytest.fixture(scope="module")
def rem(brain_data, tmp_path_factory):
    """Random tiny REM weights, a 2-case LR datalist and the datalist run's outputs."""
    root = tmp_path_factory.mktemp("rem_single")
    networks = load_bundle_scripts("rem_sr", "networks")
    torch.manual_seed(0)
    ckpt = root / "model.pt"
    torch.save(networks.REM(k=4, n=2).state_dict(), ckpt)
    datalist = root / "lr.json"
    items = [{"image": str(brain_data / "lr_syn3_T1w.nii.gz")}, {"image": str(brain_data / "lr_anatomical_T1w.nii.gz")}]
    datalist.write_text(json.dumps({"test": items}))
    result = run_bundle("rem_sr", ["inference.json"], rem_overrides(ckpt, root / "batch", datalist=str(datalist)))
    return root, ckpt, result


def rem_overrides(ckpt: Path, output_dir: Path, **extra) -> dict:
    return {
        **REM_NET,
        "scale": 2,
        "roi_size": [24, 24, 24],
        "ckpt_path": str(ckpt),
        "output_dir": str(output_dir),
        **extra,
    }


def load(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj, np.float32)


def test_rem_image_equals_the_datalist_run(rem, brain_data):
    """Issue example: ``--image path`` replaces the datalist; the SR is the datalist run's, voxel for voxel."""
    root, ckpt, _ = rem
    image = brain_data / "lr_syn3_T1w.nii.gz"
    out = root / "single"
    result = run_bundle(
        "rem_sr", ["inference.json"], rem_overrides(ckpt, out, image=str(image), datalist=str(root / "missing.json"))
    )
    case = "lr_syn3_T1w"
    assert sorted(p.name for p in (out / case).iterdir()) == [f"{case}_lr.nii.gz", f"{case}_sr.nii.gz"]
    single = nib.load(str(out / case / f"{case}_sr.nii.gz"))
    batch = nib.load(str(root / "batch" / case / f"{case}_sr.nii.gz"))
    np.testing.assert_array_equal(np.asarray(single.dataobj), np.asarray(batch.dataobj))
    np.testing.assert_array_equal(single.affine, batch.affine)
    assert [p.name for p in out.iterdir()] == [case]  # only the one file, no datalist case
    assert_paths_printed(result.stdout, out, [case])


def test_rem_image_on_another_file_and_a_missing_one(rem, brain_data, tmp_path):
    """Another instance: the 2 mm anatomical volume by ``--image``; a missing file is one clear error."""
    _, ckpt, _ = rem
    image = brain_data / "lr_anatomical_T1w.nii.gz"
    run_bundle("rem_sr", ["inference.json"], rem_overrides(ckpt, tmp_path / "a", image=str(image)))
    sr = nib.load(str(tmp_path / "a" / "lr_anatomical_T1w" / "lr_anatomical_T1w_sr.nii.gz"))
    assert sr.shape == tuple(2 * s for s in nib.load(str(image)).shape)
    missing = tmp_path / "nope.nii.gz"
    result = run_bundle(
        "rem_sr", ["inference.json"], rem_overrides(ckpt, tmp_path / "b", image=str(missing)), check=False
    )
    assert result.returncode != 0
    assert f"{missing}: file not found" in result.stderr
    assert not (tmp_path / "b").exists() or not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]


def test_rem_prints_every_case_with_all_its_files(rem):
    """One line per case of the datalist run: ``<case>: <lr>, <sr>`` (absolute paths, all existing)."""
    root, _, result = rem
    printed = assert_paths_printed(result.stdout, root / "batch", ["lr_syn3_T1w", "lr_anatomical_T1w"])
    assert [Path(f).name for f in printed["lr_syn3_T1w"]] == ["lr_syn3_T1w_lr.nii.gz", "lr_syn3_T1w_sr.nii.gz"]


def test_rem_sr_is_clipped_to_the_input_range_by_default(rem, brain_data):
    """The SR lies in [min, max] of its input; ``--clip_output false`` keeps the raw output, of which the default
    output is exactly the clipped copy."""
    root, ckpt, _ = rem
    raw_dir = root / "raw"
    run_bundle(
        "rem_sr",
        ["inference.json"],
        rem_overrides(ckpt, raw_dir, datalist=str(root / "lr.json"), clip_output="false"),
    )
    for case in ("lr_syn3_T1w", "lr_anatomical_T1w"):
        lr = load(brain_data / f"{case}.nii.gz")
        clipped = load(root / "batch" / case / f"{case}_sr.nii.gz")
        raw = load(raw_dir / case / f"{case}_sr.nii.gz")
        assert clipped.min() >= lr.min() and clipped.max() <= lr.max(), case
        if case == "lr_syn3_T1w":  # the example: negative SR values where the input's minimum is 0
            assert lr.min() == 0 and raw.min() < 0 and clipped.min() == 0
        np.testing.assert_allclose(clipped, np.clip(raw, lr.min(), lr.max()), atol=1e-6)


def test_rem_clip_output_is_a_checked_flag(rem, tmp_path):
    _, ckpt, _ = rem
    result = run_bundle(
        "rem_sr",
        ["inference.json"],
        rem_overrides(ckpt, tmp_path / "out", datalist=str(rem[0] / "lr.json"), clip_output="maybe"),
        check=False,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == "error: clip_output must be true or false, got 'maybe'"
    assert not (tmp_path / "out").exists() or not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------------ refdrn
@pytest.fixture(scope="module")
def refdrn(tmp_path_factory):
    """Synthetic pairs at 4 mm (LR x4 of subjects 3 and 2), random tiny backbone weights (the real frozen REM)."""
    root = make_pair_dataset(tmp_path_factory.mktemp("refdrn_single"))
    for sub in (3, 2):
        img = nib.load(str(root / f"sub{sub}_T1w.nii.gz"))
        hr = np.asarray(img.dataobj, np.float32)
        lr = hr.reshape(hr.shape[0] // 4, 4, hr.shape[1] // 4, 4, hr.shape[2] // 4, 4).mean((1, 3, 5))
        to_hr = np.diag([4.0, 4.0, 4.0, 1.0])
        to_hr[:3, 3] = 1.5
        nib.save(nib.Nifti1Image(lr, img.affine @ to_hr), str(root / f"lr4_sub{sub}.nii.gz"))
    networks = load_bundle_scripts("refdrn", "networks")
    torch.manual_seed(0)
    state = networks.build_registration_network(rem=None, fdrn_channels=[4, 8, 8], fdrn_num_res=1).state_dict()
    torch.save({k: v for k, v in state.items() if k.startswith("backbone.")}, root / "model.pt")
    return root


def refdrn_overrides(root: Path, output_dir: Path, **extra) -> dict:
    return {**REFDRN_NET, "ckpt_path": str(root / "model.pt"), "output_dir": str(output_dir), **extra}


def test_refdrn_moving_fixed_files_progress_and_paths(refdrn, tmp_path):
    """Issue example: ``--moving_image a --fixed_image b --moving_label c`` replaces the datalist; the run shows a
    progress bar and prints the case's line with all its files."""
    out = tmp_path / "out"
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        refdrn_overrides(
            refdrn,
            out,
            moving_image=str(refdrn / "lr4_sub3.nii.gz"),
            fixed_image=str(refdrn / "lr4_sub2.nii.gz"),
            moving_label=str(refdrn / "sub3_labels.nii.gz"),
            datalist=str(tmp_path / "missing.json"),
        ),
    )
    assert "[1/1]" in result.stderr and "100%" in result.stderr  # progress bar
    printed = assert_paths_printed(result.stdout, out, ["lr4_sub3"])
    names = {Path(f).name for f in printed["lr4_sub3"]}
    expected = {f"lr4_sub3_{p}.nii.gz" for p in ("sr_fixed", "sr_moving", "ddf", "warped", "warped_label")}
    assert expected <= names
    hr = nib.load(str(refdrn / "sub3_T1w.nii.gz"))
    assert nib.load(str(out / "lr4_sub3" / "lr4_sub3_warped.nii.gz")).shape == hr.shape


def test_refdrn_pair_without_label_and_half_a_pair(refdrn, tmp_path):
    """Another instance: the reverse pair without a label (no warped label); only one image is one clear error."""
    out = tmp_path / "out"
    result = run_bundle(
        "refdrn",
        ["inference.json"],
        refdrn_overrides(
            refdrn, out, moving_image=str(refdrn / "lr4_sub2.nii.gz"), fixed_image=str(refdrn / "lr4_sub3.nii.gz")
        ),
    )
    printed = assert_paths_printed(result.stdout, out, ["lr4_sub2"])
    assert "lr4_sub2_warped_label.nii.gz" not in {Path(f).name for f in printed["lr4_sub2"]}
    assert "lr4_sub2_warped.nii.gz" in {Path(f).name for f in printed["lr4_sub2"]}
    half = run_bundle(
        "refdrn",
        ["inference.json"],
        refdrn_overrides(refdrn, tmp_path / "half", moving_image=str(refdrn / "lr4_sub2.nii.gz")),
        check=False,
    )
    assert half.returncode != 0
    assert "give both --moving_image and --fixed_image (or neither, to use the datalist)" in half.stderr
    assert not (tmp_path / "half").exists() or not [p for p in (tmp_path / "half").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------- f3rnet_ct_mri
def test_f3rnet_prints_every_case_with_all_its_files(tmp_path):
    """f3rnet's inference prints its case's line too (datalist run, random tiny weights on a 36x40x32 phantom)."""
    from tests.f3rnet.bundle_import import load_f3rnet
    from tools import make_abdomen_phantoms

    data = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(data), "--n-subjects", "4", "--shape", "36", "40", "32"])
    torch.manual_seed(0)
    torch.save(load_f3rnet("networks").F3RNet(fr_channels=4, ms_channels=8).state_dict(), tmp_path / "model.pt")
    out = tmp_path / "out"
    result = run_bundle(
        "f3rnet_ct_mri",
        ["inference.json"],
        {
            "fr_channels": 4,
            "ms_channels": 8,
            "dataset_dir": str(data),
            "ckpt_path": str(tmp_path / "model.pt"),
            "output_dir": str(out),
        },
    )
    printed = assert_paths_printed(result.stdout, out, ["case003"])
    assert {"case003_ddf.nii.gz", "case003_warped.nii.gz"} <= {Path(f).name for f in printed["case003"]}
