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
