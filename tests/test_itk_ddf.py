"""The registration bundles' two DDF files, each applied with its own tool (issue 14, "Displacement fields").

- ``<case>_ddf.nii.gz`` (MONAI convention, voxels): MONAI ``Warp`` reproduces the saved warped label exactly and
  the saved warped image to 1e-4 (relative to the image's largest magnitude).
- ``<case>_ddf_itk.nii.gz`` (ITK convention: mm, LPS, 5D ``(X, Y, Z, 1, 3)``, intent vector, on the fixed grid):
  read by ``itk.imread`` as a vector image, used as an ``itk.DisplacementFieldTransform`` and resampled with
  ``itk.resample_image_filter`` onto the fixed grid, it reproduces the saved warped label exactly (nearest
  neighbour) and the saved warped image to 1e-4 in the interior. Interior: the voxels whose sampling point
  ``i + u(i)`` lies inside the moving array on every axis; outside it MONAI ``Warp`` pads with the border value and
  ITK's resampler with 0, so those voxels differ by design. ANTs (``ants.apply_transforms``, i.e.
  antsApplyTransforms, with the file as it is in its transform list) reproduces the same, in the peers venv
  (``make peers-venv``; skipped with the reason without it), and applies a known shift the right way round.

Both bundles run with their shipped weights on tiny pairs whose fixed image is stored in another orientation than
the moving one (refdrn: fixed LPS-flipped, moving RAS; f3rnet: the phantoms' orientation, fixed mirrored).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

from tests.helpers import make_pair_dataset, run_bundle
from tools import make_abdomen_phantoms

itk = pytest.importorskip("itk")
ROOT = Path(__file__).resolve().parents[1]


def _itk_ddf_module():
    """scripts/itk_ddf.py of refdrn (identical in f3rnet_ct_mri), imported as part of its bundle's package."""
    from tests.helpers import load_bundle_scripts

    return load_bundle_scripts("refdrn", "itk_ddf")


def _flip_xy(path_in, path_out) -> None:
    """Store a volume mirrored along array axes 0 and 1 with the affine that keeps its world content (RAS -> LPS)."""
    img = nib.load(str(path_in))
    data = np.asarray(img.dataobj)[::-1, ::-1].copy()
    n = np.asarray(img.shape[:3])
    flip = np.eye(4)
    for axis in (0, 1):
        flip[axis, axis] = -1
        flip[axis, 3] = n[axis] - 1
    nib.save(nib.Nifti1Image(data, img.affine @ flip), str(path_out))


def _array(path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _itk_warp(ddf_itk, moving, reference, nearest: bool) -> np.ndarray:
    """`moving` resampled onto `reference`'s grid through the ITK field; returned in nibabel's array order."""
    read = itk.imread(str(ddf_itk), itk.Vector[itk.F, 3])
    # ITK Python's resampler takes double transforms: the same field with double vectors, same geometry
    field = itk.image_from_array(itk.array_from_image(read).astype(np.float64), is_vector=True)
    field.CopyInformation(read)
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    transform.SetDisplacementField(field)
    image = itk.imread(str(moving), itk.F)
    ref = itk.imread(str(reference), itk.F)
    interpolator = (
        itk.NearestNeighborInterpolateImageFunction.New(image)
        if nearest
        else itk.LinearInterpolateImageFunction.New(image)
    )
    out = itk.resample_image_filter(
        image, transform=transform, interpolator=interpolator, use_reference_image=True, reference_image=ref
    )
    return np.transpose(itk.array_from_image(out))  # ITK's numpy view is (Z, Y, X)


def _interior(ddf: np.ndarray) -> np.ndarray:
    """Voxels whose MONAI sampling point i + u(i) lies inside the array on every axis (ddf: (X, Y, Z, 3) voxels)."""
    shape = ddf.shape[:3]
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    point = index + ddf
    return np.all((point >= 0) & (point <= np.asarray(shape) - 1), axis=-1)


def _check_case(case_dir, name, moving_image, moving_label, expected_shape):
    """Both DDF files of one case against its saved warped image and label; returns the measured differences."""
    ddf_img = nib.load(str(case_dir / f"{name}_ddf.nii.gz"))
    itk_img = nib.load(str(case_dir / f"{name}_ddf_itk.nii.gz"))
    warped_path, label_path = case_dir / f"{name}_warped.nii.gz", case_dir / f"{name}_warped_label.nii.gz"
    warped, warped_label = _array(warped_path).astype(np.float32), _array(label_path)
    ddf = np.asarray(ddf_img.dataobj, np.float32)
    assert ddf.shape == (*expected_shape, 3)
    assert np.abs(ddf).max() > 0.5  # a real deformation, not the identity
    # the ITK file: 5D vector intent on the fixed grid of the saved outputs, mm LPS = A3x3 u with x, y negated
    assert itk_img.shape == (*expected_shape, 1, 3)
    assert itk_img.header.get_intent()[0] == "vector" and int(itk_img.header["intent_code"]) == 1007
    assert itk_img.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(itk_img.affine, nib.load(str(warped_path)).affine, atol=1e-5)
    expected_mm = np.einsum("ij,...j->...i", ddf_img.affine[:3, :3], ddf) * [-1, -1, 1]
    np.testing.assert_allclose(np.asarray(itk_img.dataobj)[..., 0, :], expected_mm, atol=1e-4)
    scale = float(np.abs(warped).max())

    # (a) MONAI Warp with the MONAI DDF (moving arrays in the warped file's orientation: the fixed file's)
    fixed_ornt = nib.io_orientation(nib.load(str(warped_path)).affine)

    def on_fixed_axes(path):
        img = nib.load(str(path))
        ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), fixed_ornt)
        return nib.orientations.apply_orientation(np.asarray(img.dataobj), ornt)

    flow = torch.as_tensor(np.moveaxis(ddf, -1, 0))[None]
    moving = torch.as_tensor(on_fixed_axes(moving_image).astype(np.float32))[None, None]
    label = torch.as_tensor(on_fixed_axes(moving_label).astype(np.float32))[None, None]
    monai_image = Warp(mode="bilinear", padding_mode="border")(moving, flow)[0, 0].numpy()
    monai_label = Warp(mode="nearest", padding_mode="zeros")(label, flow)[0, 0].numpy().round()
    np.testing.assert_array_equal(monai_label, warped_label)
    np.testing.assert_allclose(monai_image, warped, atol=1e-4 * scale)

    # (b) ITK: DisplacementFieldTransform + resample_image_filter onto the fixed grid
    itk_label = _itk_warp(case_dir / f"{name}_ddf_itk.nii.gz", moving_label, label_path, nearest=True)
    itk_image = _itk_warp(case_dir / f"{name}_ddf_itk.nii.gz", moving_image, warped_path, nearest=False)
    np.testing.assert_array_equal(itk_label.round(), warped_label)
    inside = _interior(ddf)
    assert inside.mean() > 0.5
    image_diff = float(np.abs(itk_image - warped)[inside].max())
    assert image_diff <= 1e-4 * scale, (image_diff, scale)
    return {
        "max_ddf_voxels": float(np.abs(ddf).max()),
        "monai_image": float(np.abs(monai_image - warped).max()),
        "itk_image": image_diff,
        "scale": scale,
    }


def test_known_shift_of_two_voxels_on_an_lps_grid_in_mm():
    """A constant 2-voxel shift along array axis 0 of a grid stored LPS (RAS affine diag(-1.5, -1.5, 1.5)): axis 0
    steps -1.5 mm in RAS x, so +2 voxels = -3 mm RAS x = +3 mm LPS x."""
    itk_ddf = _itk_ddf_module()
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    u = np.zeros((3, 6, 5, 4), np.float32)
    u[0] = 2.0
    vectors = itk_ddf.monai_to_itk_ddf(u, affine)
    assert vectors.shape == (6, 5, 4, 3)
    np.testing.assert_allclose(vectors, np.broadcast_to([3.0, 0.0, 0.0], (6, 5, 4, 3)))
    # another instance: 1 voxel along axis 2 (+1.5 mm S) and -1 along axis 1 (RAS y step -1.5: +1.5 mm RAS y,
    # -1.5 mm LPS y)
    u = np.zeros((3, 2, 2, 2), np.float32)
    u[1], u[2] = -1.0, 1.0
    np.testing.assert_allclose(itk_ddf.monai_to_itk_ddf(u, affine)[1, 1, 1], [0.0, -1.5, 1.5])


def test_known_shift_file_is_read_by_itk_as_a_displacement_field(tmp_path):
    itk_ddf = _itk_ddf_module()
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    u = np.zeros((3, 6, 5, 4), np.float32)
    u[0] = 2.0
    img = itk_ddf.itk_ddf_image(u, affine)
    assert img.shape == (6, 5, 4, 1, 3) and int(img.header["intent_code"]) == 1007
    nib.save(img, str(tmp_path / "f.nii.gz"))
    field = itk.imread(str(tmp_path / "f.nii.gz"), itk.Vector[itk.F, 3])
    assert tuple(field.GetLargestPossibleRegion().GetSize()) == (6, 5, 4)
    np.testing.assert_allclose(np.asarray(field.GetOrigin()), [-10.0, -20.0, -5.0])  # LPS
    transform = itk.DisplacementFieldTransform[itk.F, 3].New()
    transform.SetDisplacementField(field)
    # voxel (1, 1, 1): RAS (8.5, 18.5, -3.5) = LPS (-8.5, -18.5, -3.5); +2 voxels along axis 0 = voxel (3, 1, 1)
    moved = np.asarray(transform.TransformPoint([-8.5, -18.5, -3.5]))
    ras = affine @ [3, 1, 1, 1]
    np.testing.assert_allclose(moved, [-ras[0], -ras[1], ras[2]], atol=1e-5)


@pytest.fixture(scope="module")
def refdrn_case(tmp_path_factory):
    """refdrn's inference on a tiny ×4 pair whose fixed image is stored LPS: (case folder, case name, pair root)."""
    tmp_path = tmp_path_factory.mktemp("refdrn_itk")
    root = make_pair_dataset(tmp_path / "pairs")
    item = {}
    for role, sub in (("moving_image", 3), ("fixed_image", 2)):
        img = nib.load(str(root / f"sub{sub}_T1w.nii.gz"))
        hr = np.asarray(img.dataobj, np.float32)
        lr = hr.reshape(hr.shape[0] // 4, 4, hr.shape[1] // 4, 4, hr.shape[2] // 4, 4).mean((1, 3, 5))
        to_hr = np.diag([4.0, 4.0, 4.0, 1.0])
        to_hr[:3, 3] = 1.5
        nib.save(nib.Nifti1Image(lr, img.affine @ to_hr), str(root / f"lr4_sub{sub}.nii.gz"))
        item[role] = f"lr4_sub{sub}.nii.gz"
    _flip_xy(root / "lr4_sub2.nii.gz", root / "lr4_sub2_lps.nii.gz")  # the fixed image stored LPS
    item["fixed_image"] = "lr4_sub2_lps.nii.gz"
    item["moving_label"] = "sub3_labels.nii.gz"
    (root / "datalist_lr_x4.json").write_text(json.dumps({"test": [item]}))
    out = tmp_path / "out"
    run_bundle("refdrn", ["inference.json"], {"dataset_dir": str(root), "output_dir": str(out)})
    return out / "lr4_sub3", "lr4_sub3", root


def test_refdrn_both_ddf_files_reproduce_the_warped_outputs(refdrn_case):
    case, name, root = refdrn_case
    assert nib.aff2axcodes(nib.load(str(case / f"{name}_ddf_itk.nii.gz")).affine) == ("L", "P", "S")
    # the saved warped image is the SR moving image warped on the upsampled grid
    diffs = _check_case(case, name, case / f"{name}_sr_moving.nii.gz", root / "sub3_labels.nii.gz", (32, 40, 32))
    print("refdrn", diffs)
    assert not list(case.parent.rglob(".partial-*"))


# Run in the peers venv (.venv-peers, `make peers-venv`): antsApplyTransforms (ants.apply_transforms) with the
# ITK-convention file as it is, onto a reference grid; argv: reference, moving, field, interpolator, output .npy
ANTS_APPLY = """
import sys
import ants
import numpy as np

reference, moving, field, interpolator, out = sys.argv[1:6]
warped = ants.apply_transforms(
    fixed=ants.image_read(reference), moving=ants.image_read(moving), transformlist=[field], interpolator=interpolator
)
np.save(out, warped.numpy())
"""


def _ants_apply(tmp_path, reference, moving, field, interpolator: str) -> np.ndarray:
    """`moving` resampled by ANTs through `field` onto `reference`'s grid (nibabel's array order)."""
    peers = ROOT / ".venv-peers" / "bin" / "python"
    if not peers.is_file():
        pytest.skip(f"{peers} is absent: ANTs (antspyx) lives in the peers venv; run `make peers-venv`")
    out = tmp_path / f"ants_{interpolator}_{Path(str(moving)).name}.npy"
    proc = subprocess.run(
        [str(peers), "-c", ANTS_APPLY, str(reference), str(moving), str(field), interpolator, str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(out)


def test_ants_applies_a_known_shift_in_the_itk_field(tmp_path):
    """A +2-voxel shift along array axis 0 of an LPS-stored grid: ANTs samples the moving image 2 voxels on."""
    itk_ddf = _itk_ddf_module()
    affine = np.diag([-1.5, -1.5, 1.5, 1.0])
    affine[:3, 3] = [10.0, 20.0, -5.0]
    u = np.zeros((3, 8, 5, 4), np.float32)
    u[0] = 2.0
    nib.save(itk_ddf.itk_ddf_image(u, affine), str(tmp_path / "field.nii.gz"))
    moving = np.arange(8 * 5 * 4, dtype=np.float32).reshape(8, 5, 4)
    nib.save(nib.Nifti1Image(moving, affine), str(tmp_path / "moving.nii.gz"))
    warped = _ants_apply(
        tmp_path, tmp_path / "moving.nii.gz", tmp_path / "moving.nii.gz", tmp_path / "field.nii.gz", "linear"
    )
    np.testing.assert_allclose(warped[:6], moving[2:], atol=1e-4)


def _check_ants(tmp_path, case, name, moving_image, moving_label) -> float:
    """antsApplyTransforms with ``<case>_ddf_itk.nii.gz`` as it is: the saved warped label exactly (nearest
    neighbour), the saved warped image to 1e-4 in the interior (see the module docstring); returns the image
    difference."""
    field = case / f"{name}_ddf_itk.nii.gz"
    warped_path, label_path = case / f"{name}_warped.nii.gz", case / f"{name}_warped_label.nii.gz"
    warped, warped_label = _array(warped_path).astype(np.float32), _array(label_path)
    ants_label = _ants_apply(tmp_path, label_path, moving_label, field, "nearestNeighbor")
    np.testing.assert_array_equal(ants_label.round(), warped_label)
    ants_image = _ants_apply(tmp_path, warped_path, moving_image, field, "linear")
    inside = _interior(np.asarray(nib.load(str(case / f"{name}_ddf.nii.gz")).dataobj, np.float32))
    scale = float(np.abs(warped).max())
    diff = float(np.abs(ants_image - warped)[inside].max())
    assert diff <= 1e-4 * scale, (diff, scale)
    return diff


def test_ants_reads_the_refdrn_itk_field_and_reproduces_the_warped_outputs(refdrn_case, tmp_path):
    case, name, root = refdrn_case
    diff = _check_ants(tmp_path, case, name, case / f"{name}_sr_moving.nii.gz", root / "sub3_labels.nii.gz")
    print("ants refdrn", diff)


def test_f3rnet_both_ddf_files_reproduce_the_warped_outputs(tmp_path):
    root = tmp_path / "phantoms"
    make_abdomen_phantoms.main(["--out", str(root), "--n-subjects", "4", "--shape", "36", "40", "32"])
    datalist = json.loads((root / "datalist_ct2mri.json").read_text())
    item = dict(datalist["test"][0])
    fixed = root / item["fixed_image"]
    _flip_xy(fixed, root / "fixed_flipped.nii.gz")  # the fixed image stored in the other in-plane orientation
    item["fixed_image"] = "fixed_flipped.nii.gz"
    (root / "datalist_ct2mri.json").write_text(json.dumps({"test": [item]}))
    out = tmp_path / "out"
    run_bundle("f3rnet_ct_mri", ["inference.json"], {"dataset_dir": str(root), "output_dir": str(out)})
    (case,) = [p for p in out.iterdir() if p.is_dir()]
    name = case.name
    assert nib.aff2axcodes(nib.load(str(case / f"{name}_ddf_itk.nii.gz")).affine) == nib.aff2axcodes(
        nib.load(str(root / "fixed_flipped.nii.gz")).affine
    )
    diffs = _check_case(case, name, root / item["moving_image"], root / item["moving_label"], (36, 40, 32))
    print("f3rnet", diffs)
    # ANTs too, where the peers venv is (the ITK checks above run everywhere)
    if (ROOT / ".venv-peers" / "bin" / "python").is_file():
        print(
            "ants f3rnet", _check_ants(tmp_path, case, name, root / item["moving_image"], root / item["moving_label"])
        )
    else:
        print("ANTs part skipped: .venv-peers is absent (make peers-venv)")
