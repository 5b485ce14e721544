"""scripts/instance_optimisation.py (shared by refdrn and f3rnet_ct_mri): composition, resizing, and the optimiser
on pairs with a known deformation."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp

from tests.helpers import load_bundle_scripts

io_module = load_bundle_scripts("refdrn", "instance_optimisation")
rm = load_bundle_scripts("refdrn", "registration_metrics")


def _blobs(shape=(32, 36, 28), seed=0) -> torch.Tensor:
    """A smooth random image [1, 1, *shape] with structure at several scales."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, *[max(2, s // 4) for s in shape], generator=g)
    return torch.nn.functional.interpolate(x, size=shape, mode="trilinear", align_corners=False)


def _smooth_field(shape, amplitude, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(1, 3, 3, 3, 3, generator=g) - 0.5) * 2 * amplitude
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)


def _lncc_io(**kwargs):
    return io_module.InstanceOptimisation(
        torch.nn.Identity(), LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=5), **kwargs
    )


def test_compose_ddf_applies_the_second_field_at_the_displaced_point():
    shape = (24, 20, 16)
    warp = Warp(mode="bilinear", padding_mode="border")
    g = torch.Generator().manual_seed(0)
    image = torch.nn.functional.interpolate(torch.rand(1, 1, 3, 3, 3, generator=g), size=shape, mode="trilinear")
    first, then = _smooth_field(shape, 2.0, seed=2), _smooth_field(shape, 2.0, seed=3)
    two_steps = warp(warp(image, then), first)
    inner = (slice(None), slice(None), slice(4, -4), slice(4, -4), slice(4, -4))
    ours = (two_steps - warp(image, io_module.compose_ddf(first, then, warp)))[inner].abs().mean()
    other_order = (two_steps - warp(image, then + warp(first, then)))[inner].abs().mean()
    assert ours < 0.002 and other_order > 3 * ours


def test_resize_ddf_keeps_the_displacement_in_millimetres():
    shift = torch.zeros(1, 3, 16, 20, 24)
    shift[:, 0] = 2.0  # 2 voxels of the fine grid along axis 0
    coarse = io_module.resize_ddf(shift, (8, 10, 12))
    assert torch.allclose(coarse[:, 0], torch.ones(1, 8, 10, 12)) and coarse[:, 1:].abs().max() == 0
    assert torch.allclose(io_module.resize_ddf(coarse, (16, 20, 24)), shift)


def test_zero_iterations_return_the_network_field_unchanged():
    ddf = _smooth_field((16, 16, 16), 1.5)
    io = _lncc_io(iterations=0, levels=[2])
    assert not io.enabled
    assert io(ddf, _blobs((16, 16, 16)), _blobs((16, 16, 16), seed=4)) is ddf


@pytest.mark.parametrize("diffeomorphic,regulariser", [(True, "diffusion"), (False, "diffusion"), (True, "bending")])
def test_io_recovers_a_known_deformation_from_identity(diffeomorphic, regulariser):
    torch.manual_seed(0)
    shape = (32, 36, 28)
    warp = Warp(mode="bilinear", padding_mode="border")
    fixed = _blobs(shape)
    truth = _smooth_field(shape, 3.0)
    moving_of = lambda ddf: warp(fixed, ddf)  # noqa: E731  (a moving image whose warp by -truth-ish is fixed)
    moving = moving_of(truth)
    # the fixed image is moving warped by the inverse of `truth`: IO must find a field close to that inverse
    io = _lncc_io(
        iterations=[60, 40], levels=[4, 2], lr=0.1, reg_weight=0.1, diffeomorphic=diffeomorphic, regulariser=regulariser
    )
    ddf = io(torch.zeros(1, 3, *shape), moving, fixed)
    before = ((moving - fixed) ** 2).mean()
    after = ((warp(moving, ddf) - fixed) ** 2).mean()
    assert after < 0.3 * before
    assert rm.folding_percent(ddf[0]) < 0.5
    assert len(io.last_seconds) == 2 and all(t > 0 for t in io.last_seconds)


def test_io_keeps_a_good_network_field_and_improves_a_rough_one():
    shape = (32, 36, 28)
    warp = Warp(mode="bilinear", padding_mode="border")
    moving = _blobs(shape, seed=5)
    truth = _smooth_field(shape, 2.5, seed=6)
    fixed = warp(moving, truth)  # fixed(x) = moving(x + truth(x)): truth is the exact DDF
    io = _lncc_io(iterations=[40, 30], levels=[4, 2], lr=0.05, reg_weight=0.1, regularise="update")
    error = lambda d: float((d - truth)[..., 4:-4, 4:-4, 4:-4].abs().mean())  # noqa: E731
    kept = io(truth.clone(), moving, fixed)
    assert error(kept) < 0.35  # starting from the answer, IO stays near it
    rough = 0.5 * truth  # a network that got half of the deformation
    refined = io(rough, moving, fixed)
    assert error(refined) < 0.6 * error(rough)


def test_field_regularisation_smooths_a_rough_network_field():
    """regularise="field" penalises the whole DDF, so IO also irons out the network's own roughness; "update" only
    keeps its own update smooth."""
    shape = (32, 36, 28)
    warp = Warp(mode="bilinear", padding_mode="border")
    moving = _blobs(shape, seed=5)
    truth = _smooth_field(shape, 2.5, seed=6)
    fixed = warp(moving, truth)
    # roughness the optimisation grids can see (IO never changes the network's field below the finest level's grid)
    coarse = torch.randn(1, 3, 8, 9, 7, generator=torch.Generator().manual_seed(15))
    noise = 0.8 * torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)
    error = lambda d: float((d - truth)[..., 4:-4, 4:-4, 4:-4].abs().mean())  # noqa: E731
    results = {}
    for mode in ("field", "update"):
        io = _lncc_io(iterations=[30, 20], levels=[4, 2], lr=0.05, reg_weight=1.0, regularise=mode)
        results[mode] = io(truth + noise, moving, fixed)
    from monai.losses import DiffusionLoss

    roughness = {mode: float(DiffusionLoss()(ddf)) for mode, ddf in results.items()}
    assert roughness["field"] < 0.8 * roughness["update"]
    assert error(results["field"]) < error(results["update"]) < error(truth + noise)


def test_invalid_settings_are_refused():
    with pytest.raises(ValueError, match="io_levels"):
        _lncc_io(levels=[])
    with pytest.raises(ValueError, match="io_levels"):
        _lncc_io(levels=[0])
    with pytest.raises(ValueError, match="io_iterations"):
        _lncc_io(iterations=[10], levels=[4, 2])
    with pytest.raises(ValueError, match="io_iterations"):
        _lncc_io(iterations=-1)
    io = _lncc_io(iterations=2, levels=[2])
    with pytest.raises(ValueError, match="one grid"):
        io(torch.zeros(1, 3, 8, 8, 8), torch.zeros(1, 1, 8, 8, 9), torch.zeros(1, 1, 8, 8, 9))
    assert math.isclose(io.lr, 0.1)
    with pytest.raises(ValueError, match="io_init"):
        _lncc_io(init="random")
    with pytest.raises(ValueError, match="io_regularise"):
        _lncc_io(regularise="both")
    with pytest.raises(ValueError, match="io_regulariser"):
        _lncc_io(regulariser="l2")


def test_init_identity_ignores_the_network_field():
    shape = (16, 20, 16)
    moving, fixed = _blobs(shape, seed=7), _blobs(shape, seed=8)
    io = _lncc_io(iterations=[5, 3], levels=[4, 2], init="identity")
    from_garbage = io(_smooth_field(shape, 4.0, seed=9), moving, fixed)
    from_zeros = _lncc_io(iterations=[5, 3], levels=[4, 2])(torch.zeros(1, 3, *shape), moving, fixed)
    assert torch.equal(from_garbage, from_zeros)
    assert from_zeros.abs().max() > 0  # IO moved


def test_a_channels_last_network_field_gives_the_same_result():
    shape = (16, 20, 16)
    moving, fixed = _blobs(shape, seed=10), _blobs(shape, seed=11)
    ddf = _smooth_field(shape, 1.0, seed=12)
    io = _lncc_io(iterations=[4, 2], levels=[4, 2])
    expected = io(ddf, moving, fixed)
    got = io(ddf.to(memory_format=torch.channels_last_3d), moving, fixed)
    assert torch.allclose(got, expected, atol=1e-5)


def test_progress_shows_one_bar_per_pair(capsys):
    shape = (16, 16, 16)
    io = _lncc_io(iterations=[3, 2], levels=[4, 2], progress=True)
    io(torch.zeros(1, 3, *shape), _blobs(shape), _blobs(shape, seed=4))
    err = capsys.readouterr().err
    assert "IO 1/4 grid 4x4x4" in err and "/5 [" in err  # one bar over both levels (tqdm throttles redraws)


def test_pooled_features_are_computed_once_on_the_full_grid():
    shape = (16, 20, 16)
    calls = []

    def features(x):
        calls.append(tuple(x.shape[2:]))
        return torch.cat([x, x**2], dim=1)

    moving, fixed = _blobs(shape, seed=13), _blobs(shape, seed=14)
    pooled = io_module.InstanceOptimisation(
        features, torch.nn.L1Loss(), iterations=2, levels=[4, 2], pool_features=True
    )
    pooled(torch.zeros(1, 3, *shape), moving, fixed)
    assert calls == [shape, shape]  # moving and fixed, once each, at full resolution
    calls.clear()
    per_level = io_module.InstanceOptimisation(features, torch.nn.L1Loss(), iterations=2, levels=[4, 2])
    per_level(torch.zeros(1, 3, *shape), moving, fixed)
    assert calls == [(4, 5, 4), (4, 5, 4), (8, 10, 8), (8, 10, 8)]


def test_boolean_settings_read_command_line_text():
    assert _lncc_io(diffeomorphic="false").diffeomorphic is False
    assert _lncc_io(pool_features="1").pool_features is True
    with pytest.raises(Exception, match="io_pool_features must be true or false") as err:
        _lncc_io(pool_features="maybe")
    assert type(err.value).__name__ == "BundleInputError"  # the bundles' one-line error, not a traceback


def test_a_batch_is_optimised_pair_by_pair():
    shape = (16, 20, 16)
    moving = torch.cat([_blobs(shape, seed=16), _blobs(shape, seed=17)])
    fixed = torch.cat([_blobs(shape, seed=18), _blobs(shape, seed=19)])
    ddf = torch.cat([_smooth_field(shape, 1.0, seed=20), _smooth_field(shape, 1.0, seed=21)])
    io = _lncc_io(iterations=[3, 2], levels=[4, 2])
    alone = [io(ddf[i : i + 1], moving[i : i + 1], fixed[i : i + 1]) for i in range(2)]
    batch = io(ddf, moving, fixed)
    assert torch.equal(batch, torch.cat(alone)) and len(io.last_seconds) == 2
    with pytest.raises(ValueError, match="one grid"):
        io(ddf, moving[:1], fixed[:1])
