"""tools/benchmark.py: the field conversion, the metric code, each peer on a known shift, and a tiny end-to-end run.

The peers (elastix, ANTs SyN, SimpleITK demons) run in ``.venv-peers`` (``make peers-venv``); without it elastix runs
in the main venv (itk-elastix is in requirements-dev.txt, so CI runs it) and the others are skipped with the reason.
"""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import load_bundle_scripts, synthetic_brain
from tools import benchmark, make_abdomen_phantoms


def _lps_affine(spacing: float = 2.0) -> np.ndarray:
    affine = np.diag([-spacing, -spacing, spacing, 1.0])  # stored LPS: array axes 0 and 1 run R->L and A->P
    affine[:3, 3] = [30.0, 40.0, -20.0]
    return affine


def test_the_bundles_itk_field_converts_back_to_their_ddf_exactly():
    itk_ddf = load_bundle_scripts("refdrn", "itk_ddf")
    rng = np.random.default_rng(0)
    u = rng.normal(0, 1.5, (3, 7, 6, 5)).astype(np.float32)
    affine = _lps_affine()
    field = itk_ddf.itk_ddf_image(u, affine)
    back = benchmark.itk_field_to_ddf(field, affine, (7, 6, 5))
    np.testing.assert_allclose(back, u, atol=1e-4)


def test_a_field_on_a_coarse_grid_converts_to_voxels_of_a_fine_grid():
    """+6 mm RAS x on a 4 mm LPS grid, read on a 1 mm RAS grid: +6 voxels along array axis 0."""
    coarse = np.diag([-4.0, -4.0, 4.0, 1.0])
    coarse[:3, 3] = [20.0, 20.0, 0.0]
    lps = np.zeros((6, 6, 5, 1, 3), np.float32)
    lps[..., 0] = -6.0  # RAS +x is LPS -x
    field = nib.Nifti1Image(lps, coarse)
    fine = np.eye(4)
    fine[:3, 3] = [-2.0, 0.0, 4.0]
    ddf = benchmark.itk_field_to_ddf(field, fine, (12, 10, 8))
    np.testing.assert_allclose(ddf[0], 6.0, atol=1e-5)
    np.testing.assert_allclose(ddf[1:], 0.0, atol=1e-5)
    with pytest.raises(ValueError, match="3 components"):
        benchmark.itk_field_to_ddf(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), fine), fine, (4, 4, 4))


def test_metrics_against_hand_computed_values():
    fixed = np.zeros((30, 24, 24), np.int64)
    fixed[10:20, 7:17, 7:17] = 5  # a 10-voxel cube with a large label id
    moving = np.roll(fixed, 2, axis=0)  # the moving cube 2 voxels further along axis 0
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    metrics, per_label = benchmark.registration_metrics(np.zeros((3, 30, 24, 24), np.float32), moving, fixed, affine)
    assert metrics["dice"] == pytest.approx(0.8)  # overlap 8 of 10 slabs
    assert per_label == {5: pytest.approx(0.8)}
    assert 0 < metrics["hd95"] <= 4.0 + 1e-6  # at most the 2-voxel shift, 2 mm per voxel along axis 0
    assert metrics["folding"] == 0 and metrics["sdlogj"] == pytest.approx(0.0)
    shift = np.zeros((3, 30, 24, 24), np.float32)
    shift[0] = 2.0  # sample the moving label 2 voxels on: the cubes coincide
    metrics, _ = benchmark.registration_metrics(shift, moving, fixed, affine)
    assert metrics["dice"] == pytest.approx(1.0) and metrics["hd95"] == pytest.approx(0.0)
    assert metrics["asd"] == pytest.approx(0.0)
    fold = np.zeros((3, 30, 24, 24), np.float32)
    fold[0] = -2.0 * np.arange(30, dtype=np.float32)[:, None, None]  # det J = 1 - 2 = -1 everywhere
    assert benchmark.registration_metrics(fold, moving, fixed, affine)[0]["folding"] == pytest.approx(100.0)


def _shifted_pair(folder, shift_voxels: float = 3.0):
    """A textured blob and the same blob moved so that fixed point x matches moving point x + 3 voxels (axis 0)."""
    from scipy.ndimage import shift

    image, _ = synthetic_brain((32, 40, 32), seed=1)
    affine = _lps_affine()
    nib.save(nib.Nifti1Image(image * 1000, affine), str(folder / "fixed.nii.gz"))
    moved = shift(image * 1000, (shift_voxels, 0, 0), order=1).astype(np.float32)
    nib.save(nib.Nifti1Image(moved, affine), str(folder / "moving.nii.gz"))
    return folder / "fixed.nii.gz", folder / "moving.nii.gz", affine


@pytest.mark.parametrize("method", benchmark.PEERS)
def test_each_peer_recovers_a_known_shift_through_the_conversion(method, tmp_path):
    python, reason = benchmark.peer_python(method)
    if python is None:
        pytest.skip(f"{method}: {reason}")
    fixed, moving, affine = _shifted_pair(tmp_path)
    field, measured = benchmark.run_peer_method(
        method, {"fixed_image": str(fixed), "moving_image": str(moving)}, tmp_path, threads=2
    )
    assert measured["seconds"] > 0 and measured["peak_rss_gb"] > 0
    ddf = benchmark.itk_field_to_ddf(nib.load(str(field)), affine, (32, 40, 32))
    interior = ddf[:, 8:24, 10:30, 8:24].reshape(3, -1).mean(1)
    print(method, interior)
    np.testing.assert_allclose(interior, [3.0, 0.0, 0.0], atol=0.35)


def test_benchmark_end_to_end_on_a_tiny_phantom_pair(tmp_path, capsys):
    root = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", "36", "40", "32"])
    out = tmp_path / "bench"
    methods = ["identity", "f3rnet_ct_mri", "f3rnet_ct_mri:network", "elastix"]
    if benchmark.peer_python("elastix")[0] is None:
        methods.remove("elastix")
    args = ["f3rnet_ct_mri", "--datalist", str(root / "datalist_ct2mri.json"), "--max_pairs", "1", "--threads", "1"]
    assert benchmark.main([*args, "--methods", *methods, "--output_dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == methods
    for row in rows:
        assert 0 <= float(row["dice"]) <= 1 and float(row["folding"]) >= 0 and row["threads"] == "1"
    assert float(rows[0]["sdlogj"]) == 0.0  # identity
    for row in rows[1:]:
        assert float(row["seconds"]) > 0 and float(row["peak_rss_gb"]) > 0.05
    # the bundle as a user runs it (network + instance optimisation) and its network alone (--io_iterations 0)
    assert float(rows[1]["io_seconds"]) > 0 and float(rows[2]["io_seconds"]) == 0
    assert float(rows[1]["seconds"]) > float(rows[1]["io_seconds"])
    per_label = list(csv.DictReader((out / "dice_per_label.csv").open()))
    assert {r["label"] for r in per_label} == {"1", "2", "3", "4"}  # liver, spleen, right and left kidney
    summary = (out / "summary.md").read_text()
    assert "| identity |" in summary and "| f3rnet_ct_mri |" in summary
    if "elastix" in methods:
        assert "| elastix |" in summary and "1.00 | 1.00 |" in summary  # elastix's ratios to itself
    png = (out / "benchmark.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20000
    printed = capsys.readouterr().out
    assert "1 thread(s) per method" in printed


def test_bad_datalists_are_one_clear_error(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps({"test": [{"fixed_image": "f.nii.gz"}]}))
    with pytest.raises(SystemExit, match="has no 'moving_image'"):
        benchmark.main(["refdrn", "--datalist", str(tmp_path / "d.json"), "--output_dir", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no 'validation' section"):
        benchmark.main(
            ["refdrn", "--datalist", str(tmp_path / "d.json"), "--section", "validation", "--output_dir", str(tmp_path)]
        )


def test_sr_benchmark_on_the_synthetic_brains(brain_data, tmp_path):
    """rem_sr's methods, each in its own measured process, with the bundle's own PSNR/SSIM code; B-spline is the
    reference of the ratios."""
    out = tmp_path / "sr"
    args = ["rem_sr", "--datalist", str(brain_data / "datalist.json"), "--methods", "nearest", "bspline"]
    assert benchmark.main([*args, "--threads", "1", "--output_dir", str(out)]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["nearest", "bspline"]
    assert float(rows[1]["psnr_brain"]) > float(rows[0]["psnr_brain"])  # B-spline beats nearest neighbour
    assert all(float(r["peak_rss_gb"]) > 0.1 and float(r["seconds"]) > 0 for r in rows)
    summary = (out / "summary.md").read_text()
    assert "time / bspline" in summary and "| bspline |" in summary
    assert (out / "benchmark.png").stat().st_size > 20000


FAKE_ECLARE = """#!{python}
# stands in for ECLARE's run-eclare: trilinear upsampling of the LR volume along its thick axis (rem_sr's own
# degradation module), written where ECLARE writes, so the benchmark must score it exactly as the trilinear method
import sys, pathlib, nibabel as nib, numpy as np, torch
sys.path.insert(0, {bundle!r})
from scripts import degradation
args = sys.argv[1:]
src, out = pathlib.Path(args[args.index("--in-fpath") + 1]), pathlib.Path(args[args.index("--out-dir") + 1])
assert args[args.index("--n-patches") + 1] == "64" and "--relative-slice-thickness" in args
lr = nib.load(str(src))
data = torch.from_numpy(np.asarray(lr.dataobj, dtype=np.float32))[None]
hr = degradation.upsample(data, [data.shape[1], data.shape[2], data.shape[3] * 4], "trilinear")[0].numpy()
nib.save(nib.Nifti1Image(hr, lr.affine), str(out / src.name.replace(".nii", "_eclare.nii")))
"""


def test_sr_benchmark_on_thick_slices_scores_eclare_like_the_bundle_methods(brain_data, tmp_path, monkeypatch):
    import sys

    fake = tmp_path / "run-eclare"
    fake.write_text(FAKE_ECLARE.format(python=sys.executable, bundle=str(benchmark.ROOT / "bundles" / "rem_sr")))
    fake.chmod(0o755)
    monkeypatch.setattr(benchmark, "ECLARE", fake)
    # a datalist of the synthetic case alone: 40x48x40 divides by 4 along z, so the fake's x4 grid is the HR grid
    datalist = json.loads((brain_data / "datalist.json").read_text())
    (tmp_path / "d.json").write_text(json.dumps({"test": datalist["test"][:1]}))
    out = tmp_path / "thick"
    args = ["rem_sr", "--datalist", str(tmp_path / "d.json"), "--dataset_dir", str(brain_data), "--scale", "1x1x4"]
    args += ["--methods", "trilinear", "eclare", "--eclare_patches", "64", "--threads", "1", "--output_dir", str(out)]
    assert benchmark.main(args) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "results.csv").open())}
    for metric in ("psnr_brain", "ssim_brain", "psnr", "ssim"):
        assert float(rows["eclare"][metric]) == pytest.approx(float(rows["trilinear"][metric]), abs=1e-4), metric
    assert float(rows["eclare"]["process_seconds"]) > 0
    summary = (out / "summary.md").read_text()
    assert "rem_sr 1×1×4" in summary and "64 training patches" in summary
    with pytest.raises(SystemExit):
        benchmark.main(["rem_sr", "--scale", "1x4"])


def test_card_fills_the_bundle_card_and_the_readme(tmp_path, monkeypatch):
    (tmp_path / "bundles" / "refdrn" / "docs").mkdir(parents=True)
    block = "<!-- benchmark:refdrn:start -->\nold\n<!-- benchmark:refdrn:end -->"
    (tmp_path / "README.md").write_text(
        f"# readme\n{block}\n<!-- benchmark:rem_sr:start -->keep<!-- benchmark:rem_sr:end -->"
    )
    (tmp_path / "bundles" / "refdrn" / "docs" / "README.md").write_text(f"# card\n{block}\n")
    monkeypatch.setattr(benchmark, "ROOT", tmp_path)
    written = benchmark.fill_cards("refdrn", "| new |")
    assert len(written) == 2
    for path in written:
        text = path.read_text()
        assert "| new |" in text and "old" not in text
    assert "keep" in (tmp_path / "README.md").read_text()


# ------------------------------------------------------------------------------------------------ before / after
def test_split_method_names_a_baseline_revision():
    assert benchmark.split_method("refdrn@ce82f87") == ("refdrn", "ce82f87")
    assert benchmark.split_method("elastix") == ("elastix", None)


def test_split_variant_names_the_bundle_overrides():
    assert benchmark.split_variant("refdrn:network") == ("refdrn", "network")
    assert benchmark.split_variant("refdrn") == ("refdrn", None)
    assert benchmark.VARIANTS["network"] == {"io_iterations": 0}
    assert benchmark.VARIANTS["io_from_identity"] == {"io_init": "identity"}
    with pytest.raises(SystemExit, match="unknown variant 'fast'"):
        benchmark.split_variant("refdrn:fast")


def test_before_after_line_compares_the_baseline_with_this_checkout():
    summary = {
        "refdrn": {"case_seconds": (8.0, 0, 4), "peak_rss_gb": (1.4, 0, 4), "dice": (0.6620, 0, 4)},
        "refdrn@abc": {"case_seconds": (24.0, 0, 4), "peak_rss_gb": (3.6, 0, 4), "dice": (0.6621, 0, 4)},
        "elastix": {"case_seconds": (float("nan"), 0, 0), "peak_rss_gb": (1.2, 0, 4), "dice": (0.66, 0, 4)},
    }
    line = benchmark.before_after(summary, ["refdrn", "refdrn@abc", "elastix"], ("dice",), "case_seconds")
    assert "refdrn, before (abc) → after: time 24.0 → 8.0 s (3.0× faster)" in line
    assert "peak RSS 3.60 → 1.40 GB" in line and "dice 0.6621 → 0.6620" in line
    assert "elastix" not in line
    assert benchmark.before_after(summary, ["refdrn", "elastix"], ("dice",), "case_seconds") == ""


def test_export_bundles_writes_a_revision_and_refuses_an_unknown_one(tmp_path):
    bundles = benchmark.export_bundles("HEAD", tmp_path)
    assert (bundles / "refdrn" / "configs" / "inference.json").is_file()
    assert (bundles / "rem_sr" / "models" / "model.pt").is_file()
    with pytest.raises(SystemExit, match="--baseline no-such-revision"):
        benchmark.export_bundles("no-such-revision", tmp_path / "x")
