"""Losses of F3RNet: MIND-SSC similarity + lambda x L2 smoothness of the DDF.

Source: Z. Xu, J. Luo, J. Yan, X. Li and J. Jayender, "F3RNet: Full-Resolution Residual Registration Network for
Multimodal Image Registration", Section 2.5, Eqs. (3)-(4) (the paper uses MIND, its ref. [12]); lambda from
Section 3.2.1 and Fig. 3. MIND: M. P. Heinrich, M. Jenkinson, M. Bhushan, T. Matin, F. V. Gleeson, M. Brady and
J. A. Schnabel, "MIND: Modality independent neighbourhood descriptor for multi-modal deformable registration",
Medical Image Analysis 16(7), pp. 1423-1435, 2012. MIND-SSC: M. P. Heinrich, M. Jenkinson, B. W. Papiez, M. Brady
and J. A. Schnabel, "Towards realtime multimodal fusion for image-guided interventions using self-similarities",
MICCAI 2013, LNCS 8149.

- ``MINDSSC``: the self-similarity-context variant of the modality independent neighbourhood descriptor
  (Heinrich et al., MICCAI 2013; MIND: Heinrich et al., MedIA 2012). For each voxel ``x`` and each of the 12
  pairs ``(p, q)`` of the 6-neighbourhood ``{+-d e_k}`` that lie ``sqrt(2) d`` apart (d = dilation), the patch
  distance ``Dp(p, q) = boxfilter_r((I(x + p) - I(x + q))**2)`` is computed with a ``(2r + 1)**3`` box filter
  (r = radius); then ``MIND_pq(x) = exp(-(Dp - min_pq Dp) / V(x))`` where the variance estimate ``V(x)`` is the
  mean of ``Dp - min Dp`` over the 12 channels, clamped to ``[1e-3, 1e3]`` x its image-wide mean (per sample).
  Borders are replicate-padded. The descriptor is invariant to ``a * I + b`` (a != 0) and nearly invariant to
  smooth monotonic intensity maps.
- ``MINDSSCLoss``: the mean squared (default) or absolute difference of two images' descriptors. The reference
  MIND-SSC loss (Heinrich; TransMorph) uses the squared difference; Eq. 4 of the paper writes an L1 norm, which is
  available as ``penalty="l1"``.
- ``GradientSmoothnessLoss``: VoxelMorph's ``Grad`` regulariser: the mean of the squared (``l2``) or absolute
  (``l1``) forward differences of the DDF along each spatial axis, averaged over the axes. This is not MONAI's
  ``BendingEnergyLoss`` (second derivatives).
- ``F3RNetLoss``: ``MINDSSCLoss(warped, fixed) + lam * GradientSmoothnessLoss(ddf)``, ``lam = 1.5`` (the paper's
  best value for F3RNet-w/o F3D and F3RNet-MRB, Section 3.2.1 and Fig. 3).

Everything is plain, differentiable PyTorch and runs on whatever device its inputs are on.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def _ssc_pairs() -> list[tuple[tuple[int, int, int], tuple[int, int, int]]]:
    """The 12 pairs of 6-neighbourhood unit offsets whose distance is sqrt(2) (all pairs but the opposite ones)."""
    neighbours = []
    for axis in range(3):
        for sign in (-1, 1):
            offset = [0, 0, 0]
            offset[axis] = sign
            neighbours.append(tuple(offset))
    pairs = [(p, q) for p, q in itertools.combinations(neighbours, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2]
    assert len(pairs) == 12
    return pairs


SSC_PAIRS = _ssc_pairs()


class MINDSSC(nn.Module):
    """
    MIND-SSC descriptor: ``[B, C, D, H, W]`` -> ``[B, 12 * C, D, H, W]`` (the 12 channels of each input channel kept
    together), values in ``(0, 1]``.

    Source: M. P. Heinrich, M. Jenkinson, B. W. Papiez, M. Brady and J. A. Schnabel, "Towards realtime multimodal
    fusion for image-guided interventions using self-similarities", MICCAI 2013 (self-similarity context, the 12
    neighbour pairs); built on MIND (Heinrich et al., "MIND: Modality independent neighbourhood descriptor for
    multi-modal deformable registration", Medical Image Analysis 16(7), 2012). The min-subtraction and the clamp
    of the variance follow the authors' public PyTorch implementation (as used in Learn2Reg / TransMorph).

    Args:
        radius: half-size of the box filter that averages the squared differences over a patch (2: 5x5x5), voxels.
        dilation: distance (voxels) of the 6 neighbours from the centre (2).
        eps: floor of the variance estimate, so that flat images give a finite descriptor.

    Raises:
        ValueError: when ``radius < 0`` or ``dilation < 1``.
    """

    def __init__(self, radius: int = 2, dilation: int = 2, eps: float = 1e-8) -> None:
        super().__init__()
        if radius < 0 or dilation < 1:
            raise ValueError(f"MINDSSC needs radius >= 0 and dilation >= 1, got {radius}, {dilation}")
        self.radius = int(radius)
        self.dilation = int(dilation)
        self.eps = float(eps)

    @property
    def num_channels(self) -> int:
        """
        Returns:
            12: the descriptor channels per input channel (one per neighbour pair).
        """
        return len(SSC_PAIRS)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        """
        Args:
            img: the image in shape [B, C, D, H, W] (any intensity unit: the descriptor is invariant to
                ``a * I + b``, a != 0).

        Returns:
            the descriptor [B, 12 * C, D, H, W], values in (0, 1].

        Raises:
            ValueError: when ``img`` is not 5-dimensional.
        """
        if img.ndim != 5:
            raise ValueError(f"MINDSSC expects a [B, C, D, H, W] tensor, got shape {tuple(img.shape)}")
        b, c = img.shape[:2]
        spatial = img.shape[2:]
        x = img.reshape(b * c, 1, *spatial)
        d = self.dilation
        padded = F.pad(x, (d,) * 6, mode="replicate")

        def shifted(offset: tuple[int, int, int]) -> torch.Tensor:
            # I(x + d * offset) for every voxel x of the original grid
            idx = [slice(d + d * o, d + d * o + n) for o, n in zip(offset, spatial)]
            return padded[:, :, idx[0], idx[1], idx[2]]

        cache: dict[tuple[int, int, int], torch.Tensor] = {}
        diffs = []
        for p, q in SSC_PAIRS:
            sp = cache.setdefault(p, shifted(p))
            sq = cache.setdefault(q, shifted(q))
            diffs.append((sp - sq) ** 2)
        dist = torch.cat(diffs, dim=1)  # [N, 12, D, H, W]
        r = self.radius
        if r > 0:
            dist = F.avg_pool3d(F.pad(dist, (r,) * 6, mode="replicate"), kernel_size=2 * r + 1, stride=1)

        dist = dist - dist.min(dim=1, keepdim=True).values
        var = dist.mean(dim=1, keepdim=True)
        mean_var = var.mean(dim=(2, 3, 4), keepdim=True)
        var = torch.minimum(torch.maximum(var, mean_var * 1e-3), mean_var * 1e3).clamp_min(self.eps)
        mind = torch.exp(-dist / var)
        return mind.reshape(b, c * self.num_channels, *spatial)


class MINDSSCLoss(nn.Module):
    """
    MIND-SSC similarity loss: the mean squared (``penalty="l2"``, default) or absolute (``"l1"``) difference of the
    MIND-SSC descriptors of two images of the same shape ``[B, C, D, H, W]``.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.5, Eq. (4) (an L1 norm of the MIND difference: ``penalty="l1"``); the squared difference is the
    MIND-SSC loss of Heinrich's reference implementation. Descriptor: :class:`MINDSSC`.

    Args:
        radius: patch radius of :class:`MINDSSC` (voxels).
        dilation: neighbour distance of :class:`MINDSSC` (voxels).
        penalty: ``"l2"`` or ``"l1"``.

    Raises:
        ValueError: when ``penalty`` is not ``"l1"`` or ``"l2"``, or for an invalid ``radius`` / ``dilation``.
    """

    def __init__(self, radius: int = 2, dilation: int = 2, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty
        self.mind = MINDSSC(radius=radius, dilation=dilation)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            pred: the warped moving image [B, C, D, H, W].
            target: the fixed image, same shape as ``pred``.

        Returns:
            the scalar loss (0 for identical descriptors; at most 1).

        Raises:
            ValueError: when ``pred`` and ``target`` differ in shape or are not 5-dimensional.
        """
        if pred.shape != target.shape:
            raise ValueError(
                f"MINDSSCLoss needs two images of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        diff = self.mind(pred) - self.mind(target)
        return diff.pow(2).mean() if self.penalty == "l2" else diff.abs().mean()


class GradientSmoothnessLoss(nn.Module):
    """
    Gradient smoothness regulariser of a DDF ``[B, C, *spatial]``: for each spatial axis, the mean of the squared
    (``l2``) or absolute (``l1``) forward differences; then the mean over the axes.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.5, Eq. (3) ("an L2-norm of the gradients of the final deformation field"); implemented as VoxelMorph's
    ``Grad`` loss (G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag and A. V. Dalca, "VoxelMorph: A Learning
    Framework for Deformable Medical Image Registration", IEEE TMI 38(8), 2019). Not MONAI's ``BendingEnergyLoss``
    (second derivatives).

    Args:
        penalty: ``"l2"`` (squared differences) or ``"l1"`` (absolute differences).

    Raises:
        ValueError: when ``penalty`` is not ``"l1"`` or ``"l2"``.
    """

    def __init__(self, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}")
        self.penalty = penalty

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ddf: the DDF in shape [B, 3, D, H, W] (voxels; any [B, C, *spatial] is accepted).

        Returns:
            the scalar regulariser (in squared voxels for ``l2``, in voxels for ``l1``).

        Raises:
            ValueError: when ``ddf`` has fewer than 3 dimensions.
        """
        if ddf.ndim < 3:
            raise ValueError(f"GradientSmoothnessLoss expects [B, C, *spatial], got shape {tuple(ddf.shape)}")
        terms = []
        for dim in range(2, ddf.ndim):
            n = ddf.shape[dim]
            diff = ddf.narrow(dim, 1, n - 1) - ddf.narrow(dim, 0, n - 1)
            terms.append(diff.pow(2).mean() if self.penalty == "l2" else diff.abs().mean())
        return torch.stack(terms).mean()


class F3RNetLoss(nn.Module):
    """
    The F3RNet training loss ``L = L_sim(I_f, I_m o phi) + lambda * L_reg(phi)``:
    ``MINDSSCLoss(warped, fixed) + lam * GradientSmoothnessLoss(ddf)``.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.5, Eq. (3); ``lam = 1.5`` is the best trade-off weight for F3RNet-w/o F3D and F3RNet-MRB
    (Section 3.2.1, Fig. 3).

    Args:
        lam: weight of the smoothness term.
        radius: MIND-SSC patch radius (voxels).
        dilation: MIND-SSC neighbour distance (voxels).
        mind_penalty: ``"l2"`` or ``"l1"`` (Eq. (4)) for :class:`MINDSSCLoss`.
        reg_penalty: ``"l2"`` (the paper) or ``"l1"`` for :class:`GradientSmoothnessLoss`.

    Raises:
        ValueError: for an invalid penalty, ``radius`` or ``dilation``.
    """

    def __init__(
        self, lam: float = 1.5, radius: int = 2, dilation: int = 2, mind_penalty: str = "l2", reg_penalty: str = "l2"
    ) -> None:
        super().__init__()
        self.lam = float(lam)
        self.similarity = MINDSSCLoss(radius=radius, dilation=dilation, penalty=mind_penalty)
        self.smoothness = GradientSmoothnessLoss(penalty=reg_penalty)

    def components(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Compute the loss and its two terms.

        Args:
            warped: the moving image warped with ``ddf``, [B, 1, D, H, W].
            fixed: the fixed image, same shape as ``warped``.
            ddf: the DDF [B, 3, D, H, W] in voxels.

        Returns:
            a dict of scalar tensors: ``"loss"`` (the total), ``"similarity"`` and ``"smoothness"`` (unweighted).

        Raises:
            ValueError: when ``warped`` and ``fixed`` differ in shape or are not 5-dimensional.
        """
        sim = self.similarity(warped, fixed)
        reg = self.smoothness(ddf)
        return {"loss": sim + self.lam * reg, "similarity": sim, "smoothness": reg}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """
        Args:
            warped: the moving image warped with ``ddf``, [B, 1, D, H, W].
            fixed: the fixed image, same shape as ``warped``.
            ddf: the DDF [B, 3, D, H, W] in voxels.

        Returns:
            the scalar total loss (see :meth:`components`).

        Raises:
            ValueError: when ``warped`` and ``fixed`` differ in shape or are not 5-dimensional.
        """
        return self.components(warped, fixed, ddf)["loss"]
