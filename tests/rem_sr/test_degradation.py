import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from tests.helpers import load_bundle_scripts

degradation = load_bundle_scripts("rem_sr", "degradation")
transforms = load_bundle_scripts("rem_sr", "transforms")


def test_downsample_and_degrade_shapes():
    hr = torch.rand(1, 40, 52, 44)
    assert degradation.downsample(hr, 4).shape == (1, 10, 13, 11)
    assert degradation.downsample(hr, 2).shape == (1, 20, 26, 22)
    for method in ("nearest", "trilinear", "bspline"):
        assert degradation.degrade(hr, 4, method).shape == hr.shape


def test_interpolators_reproduce_constants_and_degrade_loses_detail():
    const = torch.full((1, 16, 16, 16), 0.3)
    for method in ("nearest", "trilinear", "bspline"):
        assert torch.allclose(degradation.degrade(const, 4, method), const, atol=1e-5)
    noise = torch.rand(1, 32, 32, 32)
    err2 = (degradation.degrade(noise, 2) - noise).abs().mean()
    err4 = (degradation.degrade(noise, 4) - noise).abs().mean()
    assert 0 < err2 < err4


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown interpolation"):
        degradation.upsample(torch.rand(1, 4, 4, 4), (8, 8, 8), "lanczos")


def test_inference_upsampling_lands_on_the_training_grid():
    """A real LR file (4 mm voxels) upsampled by inference must equal the training degradation's
    trilinear upsampling, and its affine must be the HR affine."""
    hr = torch.rand(1, 40, 52, 44)
    hr_affine = torch.eye(4, dtype=torch.float64)
    hr_affine[:3, 3] = torch.tensor([-20.0, -26.0, -22.0])
    lr = degradation.downsample(hr, 4)
    to_hr = torch.diag(torch.tensor([4.0, 4.0, 4.0, 1.0], dtype=torch.float64))
    to_hr[:3, 3] = 1.5
    lr_image = MetaTensor(lr, affine=hr_affine @ to_hr)
    up = transforms.UpsampleToTargetd("image", scale=4)({"image": lr_image})["image"]
    assert torch.allclose(up.as_tensor(), degradation.degrade(hr, 4), atol=1e-6)
    assert np.allclose(np.asarray(up.affine), hr_affine.numpy())
    by_spacing = transforms.UpsampleToTargetd("image", scale=None, target_spacing=1.0)({"image": lr_image})["image"]
    assert torch.equal(by_spacing.as_tensor(), up.as_tensor())


def test_multiscale_then_random_selection():
    hr = MetaTensor(torch.rand(1, 16, 16, 16))
    d = degradation.MultiScaleDegraded("label", scales=[2, 4])({"label": hr})
    assert {"lr_x2", "lr_x4"} <= set(d)
    pick = degradation.RandSelectScaled(scales=[2, 4], out_key="image")
    pick.set_random_state(0)
    seen = set()
    for _ in range(20):
        out = pick(dict(d))
        assert "lr_x2" not in out and "lr_x4" not in out
        assert torch.equal(out["image"], d[f"lr_x{out['scale']:g}"])
        seen.add(out["scale"])
    assert seen == {2.0, 4.0}


def test_percentile_scaling_round_trip():
    x = MetaTensor(torch.rand(1, 10, 10, 10) * 1000)
    d = transforms.PercentileScaled("image")({"image": x})
    assert d["intensity_factor"] > 900
    assert float(d["image"].max()) < 1.02
    back = transforms.RestoreIntensityd("pred")(
        {"pred": d["image"], "intensity_factor": d["intensity_factor"], "intensity_offset": d["intensity_offset"]}
    )
    assert torch.allclose(back["pred"].as_tensor(), x.as_tensor(), rtol=1e-5)


def _reference_thick_downsample(hr: np.ndarray, axis: int, scale: int, kernel: np.ndarray) -> np.ndarray:
    """scipy reference: convolve along `axis` with the profile (edges replicated), then sample the LR slice
    centres s*i + (s-1)/2 by linear interpolation (align_corners=False)."""
    from scipy import ndimage

    blurred = ndimage.convolve1d(hr, kernel, axis=axis, mode="nearest")
    n = hr.shape[axis] // scale
    coords = np.indices([n if a == axis else hr.shape[a] for a in range(3)], dtype=np.float64)
    coords[axis] = coords[axis] * scale + (scale - 1) / 2
    return ndimage.map_coordinates(blurred, coords, order=1, mode="nearest")


@pytest.mark.parametrize("profile", ["gaussian", "box"])
@pytest.mark.parametrize("axis", [0, 2])
def test_thick_slice_downsample_matches_a_scipy_reference(profile, axis):
    hr = np.random.default_rng(axis).random((24, 20, 28)).astype(np.float32)
    scale = [1, 1, 1]
    scale[axis] = 4
    lr = degradation.downsample(torch.from_numpy(hr)[None], scale, profile)[0].numpy()
    kernel = degradation.slice_profile_kernel(4, profile).numpy()
    assert np.allclose(lr, _reference_thick_downsample(hr, axis, 4, kernel), atol=1e-5)


def test_slice_profiles_have_the_slice_thickness():
    box = degradation.slice_profile_kernel(4, "box")
    assert torch.allclose(box, torch.tensor([0.125, 0.25, 0.25, 0.25, 0.125]))
    assert torch.allclose(degradation.slice_profile_kernel(3, "box"), torch.full((3,), 1 / 3))
    gauss = degradation.slice_profile_kernel(5, "gaussian").double()
    x = torch.arange(len(gauss), dtype=torch.double) - len(gauss) // 2
    sigma = torch.sqrt((gauss * x**2).sum())
    assert float(sigma) * degradation.FWHM_PER_SIGMA == pytest.approx(5, rel=0.02)  # FWHM = thickness
    for bad in (0, -1):
        with pytest.raises(ValueError, match="thickness"):
            degradation.slice_profile_kernel(bad, "box")
    with pytest.raises(ValueError, match="slice profile"):
        degradation.slice_profile_kernel(3, "triangle")


def test_thick_slice_degradation_acts_along_its_axis_only():
    grid = torch.meshgrid(*[torch.linspace(0, 6, n) for n in (24, 20, 28)], indexing="ij")
    in_plane = (torch.sin(grid[0]) * torch.cos(grid[1]))[None]  # constant along axis 2
    through_plane = torch.sin(grid[2])[None]
    for profile in ("gaussian", "box"):
        assert torch.allclose(degradation.degrade(in_plane, [1, 1, 4], profile=profile), in_plane, atol=1e-5)
        assert not torch.allclose(
            degradation.degrade(through_plane, [1, 1, 4], profile=profile), through_plane, atol=1e-2
        )
    # a gap thins the slices: less blur than slices as thick as their spacing
    thick = degradation.degrade(through_plane, [1, 1, 4], profile="box")
    gapped = degradation.degrade(through_plane, [1, 1, 4], profile="box", gap=2)
    assert degradation.downsample(through_plane, [1, 1, 4], "box", [1, 1, 2]).shape == (1, 24, 20, 7)
    assert (gapped - through_plane).abs().mean() != (thick - through_plane).abs().mean()
    with pytest.raises(ValueError, match="gap"):
        degradation.degrade(through_plane, [1, 1, 4], profile="box", gap=4)
    with pytest.raises(ValueError, match="one per spatial axis"):
        degradation.degrade(through_plane, [1, 4])


def test_paper_protocol_is_unchanged_by_the_profile_default():
    hr = torch.rand(1, 16, 16, 16)
    plain = torch.nn.functional.interpolate(hr[None], size=(4, 4, 4), mode="trilinear", align_corners=False)[0]
    assert torch.equal(degradation.downsample(hr, 4), plain)
    assert torch.equal(degradation.Degraded("label", 4, "image")({"label": hr})["image"], degradation.degrade(hr, 4))
    thick = degradation.Degraded("label", [1, 1, 4], "image")  # auto: a per-axis scale gets the Gaussian profile
    assert torch.equal(thick({"label": hr})["image"], degradation.degrade(hr, [1, 1, 4], profile="gaussian"))


def test_rand_degraded_draws_isotropic_and_thick_slice_inputs_on_a_trimmed_grid():
    t = degradation.RandDegraded("label", "image", iso_scales=[2, 4], thick_scales=[3, 5], thick_prob=0.5)
    t.set_random_state(0)
    kinds = set()
    for _ in range(40):
        hr = torch.rand(1, 32, 31, 30)
        mask = torch.ones(1, 32, 31, 30)
        t.crop_keys = ["mask"]
        out = t({"label": hr, "mask": mask})
        scale = t.scale
        assert out["image"].shape == out["label"].shape == out["mask"].shape
        for n_in, n_out, s in zip(hr.shape[1:], out["label"].shape[1:], scale):
            assert n_out == (n_in // s * s if s > 1 else n_in)
        assert torch.equal(out["label"], hr[(slice(None),) + tuple(slice(0, n) for n in out["label"].shape[1:])])
        expected = degradation.degrade(out["label"], scale, "trilinear", t.profile, t.gap)
        assert torch.equal(out["image"], expected)
        if len(set(scale)) == 1:
            kinds.add(("iso", scale[0]))
            assert t.profile == "none" and t.gap == 0
        else:
            assert sorted(scale)[:2] == [1.0, 1.0] and max(scale) in (3, 5) and t.profile in ("gaussian", "box")
            kinds.add(("thick", max(scale)))
    assert kinds == {("iso", 2), ("iso", 4), ("thick", 3), ("thick", 5)}


def test_rand_degraded_rejects_bad_settings():
    with pytest.raises(ValueError, match="integers"):
        degradation.RandDegraded("label", thick_scales=[2.5])
    with pytest.raises(ValueError, match="profiles"):
        degradation.RandDegraded("label", profiles=["triangle"])
    with pytest.raises(ValueError, match="thick_prob"):
        degradation.RandDegraded("label", thick_prob=1.5)
    with pytest.raises(ValueError, match="smaller than the factor"):
        t = degradation.RandDegraded("label", iso_scales=[4], thick_prob=0)
        t({"label": torch.rand(1, 3, 8, 8)})


def test_validation_items_carry_their_own_degradation():
    items = degradation.expand_degradations(
        [{"name": "a", "image": "a.nii"}], [{"scale": 2}, {"scale": [1, 1, 4], "profile": "gaussian"}]
    )
    assert [i["name"] for i in items] == ["a_x2", "a_1x1x4"]
    hr = torch.rand(1, 16, 16, 16)
    t = degradation.Degraded("label", None, "image")
    assert torch.equal(t({"label": hr, "degradation": items[0]["degradation"]})["image"], degradation.degrade(hr, 2))
    out = t({"label": hr, "degradation": items[1]["degradation"]})
    assert torch.equal(out["image"], degradation.degrade(hr, [1, 1, 4], profile="gaussian")) and out["scale"] == 4
    assert degradation.degradation_label([1, 1, 4], "box", 1) == "1x1x4_box_gap1"
    assert degradation.degradation_text(4) == "x4 coarser"
    assert degradation.degradation_text([1, 1, 4]) == "1x1x4 slices"
    with pytest.raises(ValueError, match="scale"):
        degradation.expand_degradations([{"name": "a"}], [{"profile": "box"}])


def test_rand_degraded_names_the_crop_margin_when_the_trimmed_crop_is_too_small():
    t = degradation.RandDegraded("label", iso_scales=[4], thick_prob=0, min_size=[16, 16, 16])
    assert t({"label": torch.rand(1, 19, 16, 16)})["label"].shape == (1, 16, 16, 16)
    with pytest.raises(ValueError, match="crop_margin"):
        t({"label": torch.rand(1, 15, 16, 16)})  # trimmed to 12 < 16


def test_a_thick_slice_file_upsampled_by_inference_matches_the_training_degradation():
    """A 1x1x4 mm file (tools.fetch_sample_data.make_low_resolution, Gaussian slice profile) upsampled by inference's
    scale 'auto' equals the thick-slice degradation REM is trained and evaluated on, on the HR grid."""
    import nibabel as nib

    from tools.fetch_sample_data import make_low_resolution

    hr = np.random.default_rng(0).random((24, 20, 28)).astype(np.float32)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = [-12.0, -10.0, -14.0]
    lr = make_low_resolution(nib.Nifti1Image(hr, affine), (1, 1, 4), "gaussian")
    assert lr.shape == (24, 20, 7) and np.allclose(lr.header.get_zooms(), (1, 1, 4))
    image = MetaTensor(torch.from_numpy(np.asarray(lr.dataobj))[None], affine=torch.from_numpy(lr.affine))
    up = transforms.UpsampleToTargetd("image", scale="auto")({"image": image})["image"]
    expected = degradation.degrade(torch.from_numpy(hr)[None], [1, 1, 4], profile="gaussian")
    assert torch.allclose(up.as_tensor(), expected, atol=1e-5)
    assert np.allclose(np.asarray(up.affine), affine)
