"""Issue 14, "outputs users can take elsewhere": rem_sr on anisotropic scans, through ``python -m monai.bundle run``.

- ``scale: "auto"`` (the default): an isotropic input gets the trained x4 on every axis; an anisotropic one (1x1x4 mm)
  is super-resolved only along its coarser axes, to its finest spacing (1x1x1 mm), not to 0.25x0.25x1 mm;
- ``target_spacing`` never downsamples an axis that is already finer (0.9 mm in-plane stays 0.9 mm), and says so;
- an explicit ``scale`` (a number or one per axis) is applied as given, per ARRAY axis of the file as stored (a file
  stored PIL has its 4 mm axis second: ``[1, 4, 1]`` refines it, ``[1, 1, 4]`` does not);
- one line per case (input -> output shape and spacing, voxel ratio) and a ``warning:`` line beyond 64x the voxels
  or 1 GiB of float32 output;
- the output's affine covers the input's field of view.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import load_bundle_scripts, run_bundle, synthetic_brain
from tests.user_files import as_ras, read, save, stored_as

TINY = {"rem_k": 4, "rem_n": 2, "roi_size": [32, 32, 32]}


def _affine(spacing, origin) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    return affine


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny volumes: 1x1x4 mm stored RAS and the same stored PIL (its 4 mm axis second), 2 mm isotropic, and
    0.9x0.9x3 mm; random tiny REM weights."""
    root = tmp_path_factory.mktemp("rem_aniso")
    networks = load_bundle_scripts("rem_sr", "networks")
    torch.manual_seed(0)
    torch.save(networks.REM(k=4, n=2).state_dict(), root / "model.pt")
    aniso = save(synthetic_brain((20, 18, 6), seed=1)[0], root / "aniso.nii.gz", _affine((1, 1, 4), (-10, -9, -12)))
    return {
        "root": root,
        "ckpt": str(root / "model.pt"),
        "aniso": aniso,
        "aniso_pil": stored_as(aniso, root / "aniso_pil.nii.gz", "PIL"),
        "iso": save(synthetic_brain((10, 9, 8), seed=2)[0], root / "iso.nii.gz", _affine((2, 2, 2), (-9, -8, -7))),
        "fine": save(synthetic_brain((20, 20, 6), seed=3)[0], root / "fine.nii.gz", _affine((0.9, 0.9, 3), (0, 0, 0))),
    }


def infer(files, out: Path, names: list[str], check: bool = True, **overrides):
    """inference.json on the named files (one datalist item each, named as the file) into `out`."""
    datalist = out.parent / f"{out.name}.json"
    datalist.parent.mkdir(parents=True, exist_ok=True)
    datalist.write_text(json.dumps({"test": [{"name": n, "image": files[n]} for n in names]}))
    args = {**TINY, "ckpt_path": files["ckpt"], "datalist": str(datalist), "output_dir": str(out), **overrides}
    return run_bundle("rem_sr", ["inference.json"], args, check=check)


def sr(out: Path, name: str) -> nib.Nifti1Image:
    return nib.load(str(out / name / f"{name}_sr.nii.gz"))


def spacing(img: nib.Nifti1Image) -> np.ndarray:
    return np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def assert_same_field_of_view(output: nib.Nifti1Image, source: str) -> None:
    """The output grid spans exactly the input's field of view: the outer corners of the first and the last voxel
    are the same world points, and each axis keeps its direction (voxel size = field of view / new size)."""
    src = nib.load(source)
    n_in, n_out = np.asarray(src.shape[:3], float), np.asarray(output.shape[:3], float)
    np.testing.assert_allclose(output.affine[:3, :3], src.affine[:3, :3] * (n_in / n_out), atol=1e-5)
    for corner_in, corner_out in ((-0.5 * np.ones(3), -0.5 * np.ones(3)), (n_in - 0.5, n_out - 0.5)):
        np.testing.assert_allclose(output.affine @ [*corner_out, 1], src.affine @ [*corner_in, 1], atol=1e-4)


def test_auto_brings_1x1x4_to_1x1x1_and_keeps_x4_for_isotropic_input(files):
    """The issue's example: the default scale on a 1x1x4 mm scan gave 0.25x0.25x1 mm (64 times the voxels); now
    1x1x1 mm (4 times). The same volume stored PIL gets the same world result; a 2 mm isotropic input keeps the
    trained x4. One line per case, no warning."""
    out = files["root"] / "auto"
    result = infer(files, out, ["aniso", "aniso_pil", "iso"])
    assert sr(out, "aniso").shape == (20, 18, 24)
    np.testing.assert_allclose(spacing(sr(out, "aniso")), [1, 1, 1], atol=1e-5)
    assert sr(out, "aniso_pil").shape == (18, 24, 20)  # stored order kept: P, I, L
    np.testing.assert_allclose(spacing(sr(out, "aniso_pil")), [1, 1, 1], atol=1e-5)
    assert sr(out, "iso").shape == (40, 36, 32)
    np.testing.assert_allclose(spacing(sr(out, "iso")), [0.5, 0.5, 0.5], atol=1e-5)
    for name in ("aniso", "aniso_pil", "iso"):
        assert_same_field_of_view(sr(out, name), files[name])
    world, world_affine = as_ras(out / "aniso_pil" / "aniso_pil_sr.nii.gz")
    np.testing.assert_allclose(world, read(out / "aniso" / "aniso_sr.nii.gz"), atol=1e-5)
    np.testing.assert_allclose(world_affine, sr(out, "aniso").affine, atol=1e-5)
    lines = result.stdout.splitlines()
    assert (
        "aniso: 20x18x6 voxels at 1x1x4 mm -> 20x18x24 voxels at 1x1x1 mm "
        "(4x the voxels; scale auto: anisotropic input, axis 2 brought to its finest spacing 1 mm)"
    ) in lines
    assert (
        "aniso_pil: 18x6x20 voxels at 1x4x1 mm -> 18x24x20 voxels at 1x1x1 mm "
        "(4x the voxels; scale auto: anisotropic input, axis 1 brought to its finest spacing 1 mm)"
    ) in lines
    assert (
        "iso: 10x9x8 voxels at 2x2x2 mm -> 40x36x32 voxels at 0.5x0.5x0.5 mm "
        "(64x the voxels; scale auto: isotropic input, x4 along every axis (REM's training factor))"
    ) in lines
    assert warnings(result.stderr) == []


def test_target_spacing_keeps_an_axis_that_is_already_finer(files):
    """The issue's example: --target_spacing 1.0 on 0.9 mm in-plane downsampled in-plane to 1 mm; now in-plane keeps
    its 0.9 mm voxels (untouched), only the 3 mm axis is refined, and the line says so."""
    out = files["root"] / "target"
    result = infer(files, out, ["fine"], target_spacing=1.0)
    image = sr(out, "fine")
    assert image.shape == (20, 20, 18)
    np.testing.assert_allclose(spacing(image), [0.9, 0.9, 1.0], atol=1e-5)
    assert_same_field_of_view(image, files["fine"])
    assert (
        "fine: 20x20x6 voxels at 0.9x0.9x3 mm -> 20x20x18 voxels at 0.9x0.9x1 mm (3x the voxels; target_spacing "
        "1x1x1 mm; axes 0, 1 kept at 0.9x0.9 mm, finer than the target (never downsampled))"
    ) in result.stdout.splitlines()


def test_explicit_scale_is_applied_per_array_axis_of_the_stored_file(files):
    """An explicit per-axis scale is honoured as given, on the file's own array axes: [1, 1, 4] refines the RAS
    file's 4 mm axis but the PIL file's third (1 mm, left-right) axis; [1, 4, 1] refines the PIL file's 4 mm axis
    and gives the RAS file's result in world space. A scalar applies to every axis."""
    out = files["root"] / "per_axis"
    result = infer(files, out, ["aniso", "aniso_pil"], scale=[1, 1, 4])
    assert sr(out, "aniso").shape == (20, 18, 24)
    assert sr(out, "aniso_pil").shape == (18, 6, 80)
    np.testing.assert_allclose(spacing(sr(out, "aniso_pil")), [1, 4, 0.25], atol=1e-5)
    assert "aniso_pil: 18x6x20 voxels at 1x4x1 mm -> 18x6x80 voxels at 1x4x0.25 mm (4x the voxels; scale 1x1x4)" in (
        result.stdout.splitlines()
    )
    pil = files["root"] / "pil_141"
    infer(files, pil, ["aniso_pil"], scale=[1, 4, 1])
    assert sr(pil, "aniso_pil").shape == (18, 24, 20)
    world, _ = as_ras(pil / "aniso_pil" / "aniso_pil_sr.nii.gz")
    np.testing.assert_allclose(world, read(out / "aniso" / "aniso_sr.nii.gz"), atol=1e-5)
    for name in ("aniso", "aniso_pil"):
        assert_same_field_of_view(sr(out, name), files[name])
    scalar = files["root"] / "scalar"
    infer(files, scalar, ["aniso"], scale=2)
    assert sr(scalar, "aniso").shape == (40, 36, 12)
    np.testing.assert_allclose(spacing(sr(scalar, "aniso")), [0.5, 0.5, 2], atol=1e-5)


def test_a_grid_far_beyond_x4_is_warned_and_a_bad_scale_refused(files):
    """scale 8 on every axis is 512 times the voxels: the run goes on and prints one warning line; a scale below 1
    or with two numbers is one error line, before anything is written."""
    out = files["root"] / "x8"
    result = infer(files, out, ["iso"], scale=8)
    assert sr(out, "iso").shape == (80, 72, 64)
    assert warnings(result.stderr) == [
        "warning: iso: the SR grid 80x72x64 at 0.25x0.25x0.25 mm has 512 times the input's voxels, more than 64 (x4 "
        "along every axis, what REM is trained for); memory and time grow with it. For an anisotropic scan use "
        "--scale auto (axes coarser than the finest brought to it) or --target_spacing <mm>"
    ]
    for bad in ("0.5", "[1,2]"):
        refused = files["root"] / f"bad_{len(bad)}"
        result = infer(files, refused, ["iso"], check=False, scale=bad)
        assert result.returncode != 0
        assert result.stderr.strip().splitlines()[-1] == (
            "error: scale must be 'auto' or a factor >= 1, one number or one per array axis ([1, 1, 4]), got "
            + ("0.5" if bad == "0.5" else "[1, 2]")
        )
        assert not refused.exists() or not [p for p in refused.rglob("*") if p.is_file()]


def test_the_warning_rule_on_clinical_sizes():
    """The rule on grids too large to run here: a 512x512x30 scan at 0.45x0.45x5 mm with scale 4 is 64 times the
    voxels (the trained x4, not above the ratio) but 1.88 GiB of float32: warned; with auto (0.45 mm isotropic,
    11.1 times the voxels, 0.33 GiB) it is not."""
    transforms = load_bundle_scripts("rem_sr", "transforms")
    scan = SimpleNamespace(shape=(1, 512, 512, 30), affine=np.diag([0.45, 0.45, 5.0, 1.0]))
    x4 = transforms.UpsampleToTargetd("image", scale=4)
    line, warning = x4.describe("scan", scan, x4.size_for(scan), x4.plan(scan)[1])
    assert line == (
        "scan: 512x512x30 voxels at 0.45x0.45x5 mm -> 2048x2048x120 voxels at 0.1125x0.1125x1.25 mm "
        "(64x the voxels; scale 4x4x4)"
    )
    assert warning.startswith(
        "warning: scan: the SR grid 2048x2048x120 at 0.1125x0.1125x1.25 mm has 1.88 GiB as float32, more than 1 GiB;"
    )
    auto = transforms.UpsampleToTargetd("image")
    assert auto.size_for(scan) == [512, 512, 333]
    line, warning = auto.describe("scan", scan, auto.size_for(scan), auto.plan(scan)[1])
    assert warning is None and "(11.1x the voxels; scale auto: anisotropic input, axis 2 brought to" in line
