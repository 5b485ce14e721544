"""MIND-SSC descriptor and loss, the VoxelMorph-style smoothness loss and the total F3RNet loss (tiny CPU volumes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.f3rnet.bundle_import import load_f3rnet

torch.set_num_threads(1)

losses = load_f3rnet("losses")

N = 24  # size of the test volumes
M = 4  # margin kept around them in the larger source volume, so shifted crops need no padding


def smooth_volume(size: int = N + 2 * M, sigma: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Gaussian-smoothed uniform noise rescaled to [0, 1], shape [1, 1, size, size, size]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, size, size, size, generator=gen)
    k = int(3 * sigma)
    t = torch.arange(-k, k + 1, dtype=torch.float32)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = len(t)
        pad = [0] * 6
        pad[2 * (2 - dim)] = pad[2 * (2 - dim) + 1] = k
        x = F.conv3d(F.pad(x, pad, mode="replicate"), w.view(shape))
    return (x - x.min()) / (x.max() - x.min())


def crop(vol: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """The N^3 window of ``vol`` at the margin, moved by ``shift`` voxels along the first spatial axis."""
    return vol[:, :, M + shift : M + shift + N, M : M + N, M : M + N]


@pytest.fixture(scope="module")
def vol() -> torch.Tensor:
    return smooth_volume()


def test_descriptor_has_12_channels_in_0_1(vol):
    mind = losses.MINDSSC()(crop(vol))
    assert mind.shape == (1, 12, N, N, N)
    assert mind.min() > 0 and mind.max() <= 1 + 1e-6
    # the nearest neighbour pair of every voxel gets exp(0) = 1
    torch.testing.assert_close(mind.max(dim=1).values, torch.ones(1, N, N, N))


def test_the_12_pairs_are_the_sqrt2_edges_of_the_6_neighbourhood():
    pairs = losses.SSC_PAIRS
    assert len(pairs) == 12 and len(set(pairs)) == 12
    for p, q in pairs:
        assert sum(abs(a) for a in p) == sum(abs(a) for a in q) == 1
        assert sum((a - b) ** 2 for a, b in zip(p, q)) == 2


def test_descriptor_of_a_flat_image_is_finite():
    mind = losses.MINDSSC()(torch.full((1, 1, 8, 8, 8), 0.3))
    assert torch.isfinite(mind).all()


def test_multichannel_and_batch_inputs():
    x = torch.rand(2, 3, 8, 9, 10)
    mind = losses.MINDSSC()(x)
    assert mind.shape == (2, 36, 8, 9, 10)
    torch.testing.assert_close(mind[1, 12:24], losses.MINDSSC()(x[1:2, 1:2])[0])


def test_intensity_remaps_give_near_zero_loss_unlike_misalignment(vol):
    loss = losses.MINDSSCLoss()
    fixed = crop(vol)
    shifted = float(loss(crop(vol, 1), fixed))
    assert shifted > 1e-3
    # affine maps (including a contrast inversion) leave MIND-SSC unchanged
    assert float(loss(3 * fixed + 1, fixed)) < 1e-6
    assert float(loss(1 - fixed, fixed)) < 1e-6
    # smooth monotonic non-linear maps nearly so: far below the loss of a 1-voxel shift
    assert float(loss(fixed**2, fixed)) < 0.25 * shifted
    assert float(loss(torch.exp(2 * fixed), fixed)) < 0.25 * shifted
    # and a remap does not hide a misalignment
    assert float(loss(crop(vol, 2) ** 2, fixed)) > 2 * shifted


def test_loss_grows_monotonically_with_misalignment(vol):
    loss = losses.MINDSSCLoss()
    fixed = crop(vol)
    values = [float(loss(crop(vol, s), fixed)) for s in range(4)]
    assert values[0] < 1e-8
    assert all(a < b for a, b in zip(values, values[1:])), values
    # the same with the moving image in another "modality"
    values = [float(loss(1.5 - crop(vol, s) ** 2, fixed)) for s in range(4)]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_l1_penalty_option(vol):
    fixed, moving = crop(vol), crop(vol, 2)
    l1 = losses.MINDSSCLoss(penalty="l1")
    l2 = losses.MINDSSCLoss()
    diff = losses.MINDSSC()(moving) - losses.MINDSSC()(fixed)
    torch.testing.assert_close(l1(moving, fixed), diff.abs().mean())
    torch.testing.assert_close(l2(moving, fixed), diff.pow(2).mean())
    with pytest.raises(ValueError):
        losses.MINDSSCLoss(penalty="l3")


def test_loss_is_differentiable(vol):
    moving = crop(vol, 2).clone().requires_grad_(True)
    value = losses.MINDSSCLoss()(moving, crop(vol))
    value.backward()
    assert moving.grad is not None
    assert torch.isfinite(moving.grad).all()
    assert moving.grad.abs().sum() > 0


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        losses.MINDSSCLoss()(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))


def ramp_ddf() -> torch.Tensor:
    """1x3x3x3x3 DDF: channel 0 = 2 * i (first axis), channel 1 = 0, channel 2 = k (last axis)."""
    i, _, k = torch.meshgrid(*[torch.arange(3.0)] * 3, indexing="ij")
    return torch.stack([2 * i, torch.zeros_like(i), k])[None]


def test_smoothness_loss_hand_computed_on_a_ramp():
    ddf = ramp_ddf()
    # axis 0: channel 0 steps by 2 -> squared 4 on 1/3 of the (1, 3, 2, 3, 3) differences -> 4/3
    # axis 1: nothing changes -> 0;  axis 2: channel 2 steps by 1 -> 1/3;  mean over the 3 axes: (4/3 + 1/3) / 3
    torch.testing.assert_close(losses.GradientSmoothnessLoss()(ddf), torch.tensor(5 / 9))
    # l1: (2/3 + 0 + 1/3) / 3
    torch.testing.assert_close(losses.GradientSmoothnessLoss("l1")(ddf), torch.tensor(1 / 3))
    # a constant field (a translation) costs nothing
    assert float(losses.GradientSmoothnessLoss()(torch.full((1, 3, 4, 4, 4), 2.5))) == 0.0


def test_total_loss_combines_mind_and_smoothness(vol):
    fixed, warped = crop(vol), crop(vol, 1)
    ddf = ramp_ddf().expand(1, 3, 3, 3, 3)
    total = losses.F3RNetLoss()
    assert total.lam == 1.5
    parts = total.components(warped, fixed, ddf)
    torch.testing.assert_close(parts["similarity"], losses.MINDSSCLoss()(warped, fixed))
    torch.testing.assert_close(parts["smoothness"], torch.tensor(5 / 9))
    torch.testing.assert_close(total(warped, fixed, ddf), parts["similarity"] + 1.5 * 5 / 9)
    torch.testing.assert_close(losses.F3RNetLoss(lam=0.0)(fixed, fixed, ddf), torch.tensor(0.0))
