"""ReFDRN losses: hand-computed values on tiny tensors (CPU, single thread)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.helpers import load_bundle_scripts

torch.set_num_threads(1)


losses = load_bundle_scripts("refdrn", "losses")


def _reference_shift_loss(z: torch.Tensor) -> float:
    """Explicit loops over voxel pairs (x, x + m) that both lie inside the grid."""
    _, c, d, h, w = z.shape
    total = 0.0
    for m in [(u, v, t) for u in (0, 1) for v in (0, 1) for t in (0, 1) if u or v or t]:
        for ch in range(c):
            for i in range(d - m[0]):
                for j in range(h - m[1]):
                    for k in range(w - m[2]):
                        diff = z[0, ch, i + m[0], j + m[1], k + m[2]] - z[0, ch, i, j, k]
                        total += float(diff) ** 2
    return total


def test_shift_smoothness_hand_value():
    # channel 0 is the ramp 4i + 2j + k (values 0..7), channel 1 zeros, channel 2 constant.
    z = torch.zeros(1, 3, 2, 2, 2)
    z[0, 0] = torch.arange(8, dtype=torch.float32).reshape(2, 2, 2)
    z[0, 2] = 5.0
    # shift (u,v,w): difference 4u + 2v + w on (2-u)(2-v)(2-w) voxels:
    # 4*16 + 4*4 + 4*1 + 2*36 + 2*25 + 2*9 + 1*49 = 273
    loss = losses.ShiftSmoothnessLoss()(z)
    assert loss.item() == pytest.approx(273.0)
    # a periodic (wrapping) shift would add the wrap-around jumps
    wrapped = sum(((z - torch.roll(z, shifts=m, dims=(2, 3, 4))) ** 2).sum() for m in losses.SHIFTS)
    assert wrapped.item() != pytest.approx(273.0)


def test_shift_smoothness_matches_loops_and_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 3, 3, 2, 4, generator=g)
    loss = losses.ShiftSmoothnessLoss()(z)
    assert loss.item() == pytest.approx(_reference_shift_loss(z), rel=1e-5)
    # "mean": each shift's sum divided by its element count
    expected = 0.0
    for u, v, t in losses.SHIFTS:
        diff = z[:, :, u:, v:, t:] - z[:, :, : 3 - u, : 2 - v, : 4 - t]
        expected += float((diff**2).sum()) / diff.numel()
    assert losses.ShiftSmoothnessLoss("mean")(z).item() == pytest.approx(expected, rel=1e-5)
    assert losses.ShiftSmoothnessLoss()(torch.full((1, 3, 4, 4, 4), 2.5)).item() == 0.0


def _plain_lncc_loss(pred: torch.Tensor, target: torch.Tensor, k: int, eps: float = 1e-5) -> torch.Tensor:
    """-mean(squared local NCC) with a k^3 box window and zero padding, in plain torch."""
    box = torch.ones(1, 1, k, k, k)
    s = lambda x: F.conv3d(x, box, padding=k // 2)  # noqa: E731
    n = float(k**3)
    t_sum, p_sum = s(target), s(pred)
    cross = s(target * pred) - p_sum / n * t_sum
    t_var = torch.clamp(s(target * target) - t_sum / n * t_sum, min=eps)
    p_var = torch.clamp(s(pred * pred) - p_sum / n * p_sum, min=eps)
    return -(cross * cross / (t_var * p_var)).mean()


def _plain_huber(a: torch.Tensor, b: torch.Tensor, delta: float) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < delta, 0.5 * d**2, delta * (d - 0.5 * delta)).mean()


def _images(shape=(1, 1, 6, 7, 8)):
    g = torch.Generator().manual_seed(1)
    moving = torch.rand(shape, generator=g)
    fixed = torch.rand(shape, generator=g) * 1.5
    return moving, fixed


def test_refdrn_loss_components_identity_rem_zero_ddf():
    moving, fixed = _images()
    ddf = torch.zeros(1, 3, *moving.shape[2:])
    delta = 0.3  # differences in [-1, 1.5]: both Huber branches are used
    loss_fn = losses.ReFDRNLoss(rem=None, kernel_size=3, huber_delta=delta)
    out = loss_fn(ddf, moving, fixed)
    assert set(out) >= {"loss", "main", "aux", "reg"}

    assert out["reg"].item() == 0.0
    assert out["aux"].item() == pytest.approx(_plain_huber(moving, fixed, delta).item(), rel=1e-5)
    monai_lncc = losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=3)(moving, fixed)
    assert out["main"].item() == pytest.approx(monai_lncc.item(), rel=1e-5)
    assert out["main"].item() == pytest.approx(_plain_lncc_loss(moving, fixed, 3).item(), rel=1e-4)
    assert out["main"].item() < 0  # it is the NEGATIVE LNCC
    expected_total = out["main"] + 10.0 * out["aux"] + 1e-8 * out["reg"]
    assert out["loss"].item() == pytest.approx(expected_total.item(), rel=1e-6)


def test_refdrn_loss_default_kernel_and_identical_images():
    moving, fixed = _images((1, 1, 10, 10, 10))
    ddf = torch.zeros(1, 3, 10, 10, 10)
    out = losses.ReFDRNLoss()(ddf, moving, fixed)  # kernel 9, identity REM
    assert out["main"].item() == pytest.approx(_plain_lncc_loss(moving, fixed, 9).item(), rel=1e-4)
    same = losses.ReFDRNLoss()(ddf, fixed, fixed)
    assert same["main"].item() == pytest.approx(-1.0, abs=1e-3)
    assert same["aux"].item() == pytest.approx(0.0, abs=1e-10)  # grid_sample round-off only


def test_lambda1_zero_drops_aux_term():
    moving, fixed = _images()
    ddf = 0.3 * torch.randn(1, 3, *moving.shape[2:], generator=torch.Generator().manual_seed(2))
    out = losses.ReFDRNLoss(lambda1=0.0, kernel_size=3)(ddf, moving, fixed)
    assert out["aux"].item() == 0.0
    assert out["reg"].item() > 0
    assert out["loss"].item() == pytest.approx((out["main"] + 1e-8 * out["reg"]).item(), rel=1e-6)
    with_aux = losses.ReFDRNLoss(lambda1=10.0, kernel_size=3)(ddf, moving, fixed)
    assert with_aux["aux"].item() > 0
    assert with_aux["loss"].item() == pytest.approx((out["loss"] + 10.0 * with_aux["aux"]).item(), rel=1e-5)
    # lambda2 weights the (large, summed) regulariser
    big = losses.ReFDRNLoss(lambda1=0.0, lambda2=1.0, kernel_size=3)(ddf, moving, fixed)
    assert big["loss"].item() == pytest.approx((out["main"] + out["reg"]).item(), rel=1e-5)


def test_warp_convention_voxel_units():
    """A constant DDF of +1 voxel along D samples moving at i + 1 (MONAI Warp convention)."""
    moving, fixed = _images((1, 1, 6, 6, 6))
    ddf = torch.zeros(1, 3, 6, 6, 6)
    ddf[:, 0] = 1.0
    loss_fn = losses.ReFDRNLoss()
    warped = loss_fn.warp(moving, ddf)
    torch.testing.assert_close(warped[:, :, :-1], moving[:, :, 1:])


class _Scale(nn.Module):
    def __init__(self, s: float) -> None:
        super().__init__()
        self.conv = nn.Conv3d(1, 1, kernel_size=1, bias=False)
        nn.init.constant_(self.conv.weight, s)

    def forward(self, x):
        return self.conv(x)


def test_rem_is_applied_and_frozen_in_loss():
    moving, fixed = _images()
    ddf = torch.zeros(1, 3, *moving.shape[2:], requires_grad=True)
    rem = _Scale(2.0)
    loss_fn = losses.ReFDRNLoss(rem=rem, kernel_size=3, huber_delta=0.3)
    loss_fn.train()
    assert not rem.training and not rem.conv.weight.requires_grad
    out = loss_fn(ddf, moving, fixed)
    assert out["aux"].item() == pytest.approx(_plain_huber(2 * moving, 2 * fixed, 0.3).item(), rel=1e-5)
    out["loss"].backward()
    assert ddf.grad is not None and ddf.grad.abs().sum() > 0
    assert rem.conv.weight.grad is None


def test_aux_warps_lr_image_then_applies_rem():
    """L_aux = Huber(REM(warp(M_LR)), REM(F_LR)), not Huber(warp(REM(M_LR)), ...): the order matters for a
    non-linear REM with a non-integer displacement."""
    from monai.networks.blocks import Warp

    moving, fixed = _images((1, 1, 6, 6, 6))
    torch.manual_seed(5)
    rem = nn.Sequential(nn.Conv3d(1, 1, 3, padding=1), nn.ReLU())
    ddf = torch.full((1, 3, 6, 6, 6), 0.5)
    ddf[:, 1] = -0.3
    warp, huber = Warp(mode="bilinear", padding_mode="border"), nn.HuberLoss(delta=0.1)
    with torch.no_grad():
        out = losses.ReFDRNLoss(rem=rem, kernel_size=3, huber_delta=0.1)(ddf, moving, fixed)
        expected = huber(rem(warp(moving, ddf)), rem(fixed))
        swapped = huber(warp(rem(moving), ddf), rem(fixed))
        main = losses.LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=3)(
            warp(rem(moving), ddf), rem(fixed)
        )
    assert out["aux"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert abs(expected.item() - swapped.item()) > 1e-4 * abs(expected.item())
    assert out["main"].item() == pytest.approx(main.item(), rel=1e-5)  # main: warp(REM(M)) vs REM(F)


def test_aux_ddf_term_decays():
    moving, fixed = _images((1, 1, 8, 8, 8))
    ddf = torch.zeros(1, 3, 8, 8, 8)
    aux_ddf = 0.2 * torch.randn(1, 3, 2, 2, 2, generator=torch.Generator().manual_seed(3))
    loss_fn = losses.ReFDRNLoss(kernel_size=3, aux_ddf_weight=2.0, aux_ddf_decay=0.5)
    base = losses.ReFDRNLoss(kernel_size=3)(ddf, moving, fixed, aux_ddf=aux_ddf)
    assert base["aux_ddf_loss"].item() == 0.0  # off by default
    out0 = loss_fn(ddf, moving, fixed, aux_ddf=aux_ddf, iteration=0)
    out3 = loss_fn(ddf, moving, fixed, aux_ddf=aux_ddf, iteration=3)
    assert out0["aux_ddf_weight"].item() == pytest.approx(2.0)
    assert out3["aux_ddf_weight"].item() == pytest.approx(2.0 * 0.5**3)
    assert out0["aux_ddf_loss"].item() < 0  # a (negative) LNCC on the coarse grid
    assert out0["loss"].item() == pytest.approx((base["loss"] + 2.0 * out0["aux_ddf_loss"]).item(), rel=1e-5)
    assert out3["loss"].item() == pytest.approx((base["loss"] + 0.25 * out3["aux_ddf_loss"]).item(), rel=1e-5)
