"""ReFDRN losses.

Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
Section III-B, Eqs. (3)-(6); weights lambda1 = 10 and lambda2 = 1e-8 from Section IV-B.2. The optional coarse term
is the auxiliary loss of FDRN (K. Sun and S. Simon, "FDRN: A fast deformable registration network for medical
images", Med. Phys. 48(10), 2021). The papers call the displacement field a "DVF" (displacement vector field); it
is called DDF here, as in MONAI, where DVF denotes a velocity field.

``L_total = L_main + lambda1 * L_aux + lambda2 * L_reg`` (+ optionally FDRN's decaying coarse-DDF term):

- ``L_main = -LNCC(phi o REM(M_LR), REM(F_LR))`` (eq. 4): MONAI's ``LocalNormalizedCrossCorrelationLoss``, which
  already returns the *negative* (squared, as in VoxelMorph) local NCC averaged over voxels, so it is used as is.
  Rectangular window, ``kernel_size`` 9 by default (VoxelMorph's window; FDRN's is not stated).
- ``L_aux = Huber(REM(phi o M_LR), REM(F_LR))`` (eq. 6): the DDF warps the *LR input* (on the HR grid, i.e. the
  trilinear-upsampled LR image that the cascade receives), which is then passed through the frozen REM; the
  gradient reaches the DDF through REM. ``torch.nn.HuberLoss`` with mean reduction; ``huber_delta`` defaults to
  0.1, the delta REM itself is trained with in the ``rem_sr`` bundle (the paper does not give it).
- ``L_reg = sum_{m in {0,1}^3, m != 0} ||z - S_m z||_2^2`` (eq. 5): see :class:`ShiftSmoothnessLoss`.
- Optional coarse-DDF term (FDRN's deep supervision at the bottom layer): ``w(it) * -LNCC(aux_ddf o
  pool(REM(M_LR)), pool(REM(F_LR)))`` on the coarse grid of the auxiliary DDF, with ``w(it) = aux_ddf_weight *
  aux_ddf_decay ** iteration``. ``pool`` is adaptive average pooling onto the auxiliary grid (exactly the
  2**L x 2**L x 2**L cell average when the size is a multiple of 2**L), and the aux DDF is in coarse-grid voxel
  units. Off by default (``aux_ddf_weight=0``): Eq. (3) of ReFDRN does not have it.

All warping uses ``monai.networks.blocks.Warp`` (bilinear, ``border`` padding by default: MONAI's default).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from monai.losses import LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from torch import nn

__all__ = ["ReFDRNLoss", "ShiftSmoothnessLoss", "SHIFTS"]

#: the 7 non-zero shift vectors m = (u, v, w) in {0, 1}^3
SHIFTS: tuple[tuple[int, int, int], ...] = tuple(m for m in itertools.product((0, 1), repeat=3) if any(m))


class ShiftSmoothnessLoss(nn.Module):
    """
    Shift smoothness regulariser of a DDF: ``L_reg = sum over the 7 non-zero m in {0,1}^3 of ||z - S_m z||_2^2``.

    Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section III-B, Eq. (5) (taken over from FDRN).

    ``S_m`` shifts the field by ``m`` voxels along (D, H, W). The difference is only taken where it is defined:
    the field is *cropped* (``z[..., u:, v:, w:] - z[..., :-u, :-v, :-w]``), not wrapped around (no periodic
    boundary), so the boundary adds no spurious jump. The squared differences are summed over the batch, the 3
    displacement components and the voxels.

    Args:
        reduction: ``"sum"`` (default) is the paper's formula, a plain squared L2 norm; this is why the paper's
            weight is as small as lambda2 = 1e-8 (the sum over ~5.9M voxels x 3 components x 7 shifts is large).
            ``"mean"`` divides each shift's sum by its number of elements (then sums over the 7 shifts), which
            makes the value independent of the image size, but then lambda2 must be retuned.

    Raises:
        ValueError: when ``reduction`` is not ``"sum"`` or ``"mean"``.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        self.reduction = reduction

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """
        Args:
            z: the DDF in shape [B, 3, D, H, W] (voxels; any number of channels is accepted).

        Returns:
            the scalar regulariser (squared voxels; summed, or averaged per shift with ``reduction="mean"``).

        Raises:
            ValueError: when ``z`` is not 5-dimensional.
        """
        if z.ndim != 5:
            raise ValueError(f"expected a field [B, C, D, H, W], got {tuple(z.shape)}")
        total = z.new_zeros(())
        for u, v, w in SHIFTS:
            d, h, ww = z.shape[2:]
            diff = z[:, :, u:, v:, w:] - z[:, :, : d - u, : h - v, : ww - w]
            sq = diff.pow(2)
            total = total + (sq.sum() if self.reduction == "sum" else sq.sum() / max(sq.numel(), 1))
        return total


class ReFDRNLoss(nn.Module):
    """
    The ReFDRN training loss ``L_main + lambda1 * L_aux + lambda2 * L_reg`` (+ optional decaying coarse-DDF term).

    Source: K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical Images",
    Section III-B, Eq. (3) (total), Eq. (4) (``L_main``, MONAI ``LocalNormalizedCrossCorrelationLoss``), Eq. (5)
    (``L_reg``, :class:`ShiftSmoothnessLoss`) and Eq. (6) (``L_aux``, Huber); the coarse term is FDRN's auxiliary
    loss (Sun & Simon, "FDRN: A fast deformable registration network for medical images", Med. Phys. 2021). See
    the module docstring for the details.

    Args:
        rem: the frozen REM (the same module as the cascade's); ``None`` is the identity. Its parameters are set
            to ``requires_grad=False`` and it is kept in eval mode; gradients still flow through it.
        lambda1: weight of ``L_aux`` (paper: 10); 0 skips the term entirely (the "without AL" ablation).
        lambda2: weight of ``L_reg`` (paper: 1e-8).
        kernel_size: LNCC window (odd).
        huber_delta: delta of the Huber loss in ``L_aux``.
        reg_reduction: reduction of :class:`ShiftSmoothnessLoss` (``"sum"`` as in the paper).
        aux_ddf_weight: initial weight of the coarse-DDF term (0 switches it off).
        aux_ddf_decay: per-iteration decay of that weight: ``aux_ddf_weight * aux_ddf_decay ** iteration``.
        aux_ddf_kernel_size: LNCC window on the coarse grid (odd, voxels of the coarse grid).
        warp_mode: ``monai.networks.blocks.Warp`` interpolation mode.
        warp_padding: ``monai.networks.blocks.Warp`` padding mode.

    ``forward(ddf, moving, fixed, sr_moving=None, sr_fixed=None, aux_ddf=None, iteration=0)`` takes the DDF on the
    HR grid, the (trilinear-upsampled) LR images ``M_LR``/``F_LR`` on the same grid, optionally the SR images
    already computed by the cascade (``REM(M_LR)``, ``REM(F_LR)``; recomputed otherwise) and the auxiliary coarse
    DDF. It returns a dict of tensors: ``loss`` (the total), ``main``, ``aux``, ``reg`` (unweighted components),
    ``aux_ddf_loss`` (the unweighted coarse term) and ``aux_ddf_weight`` (its current weight).

    Raises:
        ValueError: when ``reg_reduction`` is not ``"sum"`` or ``"mean"``, or an LNCC window is even (raised by
            MONAI's ``LocalNormalizedCrossCorrelationLoss``).
    """

    def __init__(
        self,
        rem: nn.Module | None = None,
        lambda1: float = 10.0,
        lambda2: float = 1e-8,
        kernel_size: int = 9,
        huber_delta: float = 0.1,
        reg_reduction: str = "sum",
        aux_ddf_weight: float = 0.0,
        aux_ddf_decay: float = 0.999,
        aux_ddf_kernel_size: int = 3,
        warp_mode: str = "bilinear",
        warp_padding: str = "border",
    ) -> None:
        super().__init__()
        self._rem = (rem,)  # not a registered submodule: it belongs to rem_sr and is never trained or saved
        if rem is not None:
            rem.requires_grad_(False)
            rem.eval()
        self.lambda1 = float(lambda1)
        self.lambda2 = float(lambda2)
        self.aux_ddf_weight = float(aux_ddf_weight)
        self.aux_ddf_decay = float(aux_ddf_decay)
        self.similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=kernel_size)
        self.coarse_similarity = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=aux_ddf_kernel_size)
        self.huber = nn.HuberLoss(delta=huber_delta)
        self.regularization = ShiftSmoothnessLoss(reduction=reg_reduction)
        self.warp = Warp(mode=warp_mode, padding_mode=warp_padding)

    @property
    def rem(self) -> nn.Module | None:
        """
        Returns:
            the frozen REM (not a registered submodule), or ``None`` for the identity.
        """
        return self._rem[0]

    def train(self, mode: bool = True) -> ReFDRNLoss:
        """
        Set the training mode of the loss; REM always stays in eval mode.

        Args:
            mode: training (true) or evaluation (false) mode.

        Returns:
            self.
        """
        super().train(mode)
        if self.rem is not None:
            self.rem.eval()
        return self

    def enhance(self, x: torch.Tensor) -> torch.Tensor:
        """
        Apply the frozen REM, with gradients flowing through it.

        Args:
            x: images in shape [N, 1, D, H, W] (trilinear-upsampled LR, or warped LR for ``L_aux``).

        Returns:
            ``REM(x)``, same shape (``x`` itself when there is no REM).
        """
        return x if self.rem is None else self.rem(x)

    def ddf_weight(self, iteration: int) -> float:
        """
        Current weight of the coarse-DDF term (FDRN's exponentially decaying auxiliary loss weight).

        Args:
            iteration: the training iteration (negative values count as 0).

        Returns:
            ``aux_ddf_weight * aux_ddf_decay ** iteration``.
        """
        return self.aux_ddf_weight * self.aux_ddf_decay ** max(int(iteration), 0)

    def forward(
        self,
        ddf: torch.Tensor,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        sr_moving: torch.Tensor | None = None,
        sr_fixed: torch.Tensor | None = None,
        aux_ddf: torch.Tensor | None = None,
        iteration: int = 0,
    ) -> dict[str, torch.Tensor]:
        """
        Compute the loss and its components.

        Args:
            ddf: the predicted DDF on the HR grid, in shape [B, 3, D, H, W] (voxels, MONAI ``Warp`` convention).
            moving: the trilinear-upsampled LR moving image ``M_LR`` [B, 1, D, H, W].
            fixed: the trilinear-upsampled LR fixed image ``F_LR`` [B, 1, D, H, W].
            sr_moving: ``REM(M_LR)`` [B, 1, D, H, W] if already computed (recomputed when ``None``).
            sr_fixed: ``REM(F_LR)`` [B, 1, D, H, W] if already computed (recomputed when ``None``).
            aux_ddf: the auxiliary coarse DDF [B, 3, d, h, w] in coarse-grid voxels, or ``None``.
            iteration: the training iteration, for the decay of the coarse-DDF weight.

        Returns:
            a dict of scalar tensors: ``"loss"`` (the weighted total, to back-propagate), ``"main"`` (negative
            LNCC, in [-1, 0]), ``"aux"`` (Huber, 0 when ``lambda1 == 0``), ``"reg"`` (Eq. (5), squared voxels),
            ``"aux_ddf_loss"`` (unweighted coarse negative LNCC, 0 when off) and ``"aux_ddf_weight"`` (its weight).

        Raises:
            ValueError: when the shapes of ``ddf`` and the images do not match (raised by MONAI's ``Warp`` or LNCC)
                or ``ddf`` is not 5-dimensional.
        """
        if sr_moving is None:
            sr_moving = self.enhance(moving)
        if sr_fixed is None:
            sr_fixed = self.enhance(fixed)
        zero = ddf.new_zeros(())

        main = self.similarity(self.warp(sr_moving, ddf), sr_fixed)
        reg = self.regularization(ddf)
        total = main + self.lambda2 * reg

        aux = zero
        if self.lambda1 != 0.0:
            aux = self.huber(self.enhance(self.warp(moving, ddf)), sr_fixed)
            total = total + self.lambda1 * aux

        weight = self.ddf_weight(iteration)
        aux_ddf_loss = zero
        if aux_ddf is not None and weight > 0.0:
            size = aux_ddf.shape[2:]
            coarse_moving = F.adaptive_avg_pool3d(sr_moving, size)
            coarse_fixed = F.adaptive_avg_pool3d(sr_fixed, size)
            aux_ddf_loss = self.coarse_similarity(self.warp(coarse_moving, aux_ddf), coarse_fixed)
            total = total + weight * aux_ddf_loss

        return {
            "loss": total,
            "main": main,
            "aux": aux,
            "reg": reg,
            "aux_ddf_loss": aux_ddf_loss,
            "aux_ddf_weight": ddf.new_tensor(weight),
        }
