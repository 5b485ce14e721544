"""Instance optimisation (IO): refine a registration network's DDF for one pair with the bundle's own similarity.

Shared by refdrn and f3rnet_ct_mri (identical copies, kept in sync by ``tools/sync_common.py`` and checked by
``tests/test_common_copies.py``).

The network gives a fast first estimate ``d_net``; IO then optimises, for this pair only, an update ``u`` composed
*after* it, so the network's field is the starting point and never thrown away (``u = 0`` at the start):

    warped(x) = moving(x + d(x)),   d(x) = u(x) + d_net(x + u(x))      (d = d_net o u, as displacements)

``u`` is the exponential of a stationary velocity field (SVF) ``v``, integrated by scaling and squaring with MONAI's
``DVF2DDF`` (``diffeomorphic=True``, the default: ``u`` cannot fold), or ``v`` itself (a plain displacement). The
objective is the bundle's similarity between the warped moving features and the fixed features plus
``reg_weight`` times MONAI's ``DiffusionLoss`` (or ``BendingEnergyLoss``: ``regulariser``) of the whole field ``d``
(``regularise="field"``, the default, as ConvexAdam and LapIRN's IO regularise the field they output, so IO also
smooths the network's own rough spots) or of the update ``u`` alone (``regularise="update"``), and, for the plain
displacement, a penalty on negative Jacobian determinants of ``u``. Adam optimises ``v`` level by level, coarse to
fine (``levels``: grid factors such as ``[4, 2]``: quarter, then half resolution); each level's ``v`` is upsampled
to start the next, and the last level's ``u`` is upsampled to the full grid and composed with ``d_net`` there once.

Features are computed once per level (LNCC: the images themselves; MIND-SSC: the descriptors, which are then warped
instead of recomputed, as ConvexAdam does): from the average-pooled images, or (``pool_features=True``) once on the
full grid and then average-pooled to each level's grid, as ConvexAdam pools its MIND-SSC features. An iteration
costs one warp of the moving features, the SVF integration and the loss on the level's grid.

Source: the Learn2Reg practice of instance optimisation on top of a learned estimate (e.g. Siebert, Hansen and
Heinrich, "Fast 3D registration with accurate optimisation and little learning for Learn2Reg 2021" (ConvexAdam);
Mok and Chung, LapIRN with instance optimisation); SVF integration by scaling and squaring (Arsigny et al., 2006;
MONAI ``DVF2DDF``); ``Warp``, ``DiffusionLoss`` from MONAI.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, DiffusionLoss
from monai.networks.blocks import DVF2DDF, Warp

from .common import config_flag

__all__ = ["InstanceOptimisation", "compose_ddf", "resize_ddf"]


def resize_ddf(ddf: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A DDF ``[B, 3, *grid]`` in voxels resampled (trilinear) to another grid of the same field of view, its values
    rescaled to voxels of the new grid (per axis)."""
    scale = torch.tensor([n / o for n, o in zip(size, ddf.shape[2:])], dtype=ddf.dtype, device=ddf.device)
    out = F.interpolate(ddf, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)
    return out * scale.view(1, -1, *([1] * len(size)))


def compose_ddf(first: torch.Tensor, then: torch.Tensor, warp: Warp) -> torch.Tensor:
    """The DDF of applying `then` after `first` (as MONAI ``Warp`` reads DDFs): ``first(x) + then(x + first(x))``.

    Args:
        first: the DDF applied first at the fixed point, ``[B, 3, *grid]`` in voxels (IO's update ``u``).
        then: the DDF sampled at the displaced point, same shape (the network's field).
        warp: a bilinear MONAI ``Warp`` (border padding: the field continues at the grid's edge).

    Returns:
        ``[B, 3, *grid]`` in voxels: ``warp(moving, result) == warp(warp(moving, then), first)`` up to interpolation.
    """
    return first + warp(then, first)


class InstanceOptimisation:
    """Optimise an update of a network's DDF for one pair (see the module docstring).

    Args:
        features: maps an image ``[1, C, *grid]`` to the features the similarity compares (``torch.nn.Identity()``
            for LNCC; the MIND-SSC descriptor for f3rnet_ct_mri). Computed once per level, without gradients.
        similarity: ``(warped moving features, fixed features) -> scalar loss`` (lower is better).
        iterations: Adam steps per level (one number for every level, or one per level); 0 turns IO off: the
            network's DDF is returned unchanged (the same tensor values).
        levels: grid factors, coarse to fine (e.g. ``[4, 2]``); each must divide into the grid by average pooling.
        lr: Adam's learning rate, in voxels of the level's grid.
        reg_weight: weight of MONAI's ``DiffusionLoss`` of the update ``u``.
        diffeomorphic: ``u = exp(v)`` (SVF, ``DVF2DDF``) when true; else ``u = v`` with a penalty on negative
            Jacobian determinants (weight ``reg_weight``).
        integration_steps: scaling-and-squaring steps of ``DVF2DDF``.
        progress: show one progress bar per pair over every level's iterations (tqdm).
        init: ``"network"`` (the default): start from the network's DDF; ``"identity"``: discard it and start from
            zero displacement (the ablation "IO from identity", which shows what the network contributes).
        regularise: ``"field"`` (the default): the smoothness penalty of the whole DDF ``d``; ``"update"``: of ``u``.
        regulariser: the smoothness penalty, MONAI's ``DiffusionLoss`` (``"diffusion"``, the default: first
            derivatives) or ``BendingEnergyLoss`` (``"bending"``: second derivatives; its grids need at least 5
            voxels per axis).
        pool_features: compute the features once on the full grid and average-pool them to each level's grid
            (fine structure survives in the pooled descriptors); false: the features of the average-pooled images.
            The same thing for ``torch.nn.Identity()`` features.

    Raises:
        BundleInputError: (at construction) ``diffeomorphic`` or ``pool_features`` is not a boolean (command-line
            text such as "false" is read with MONAI's ``str2bool``).
        ValueError: (at construction) negative iterations, an empty or non-positive ``levels``, per-level
            iterations that do not match ``levels``, or an unknown ``init``, ``regularise`` or ``regulariser``.
    """

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor],
        similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        iterations: int | Sequence[int] = 50,
        levels: Sequence[int] = (4, 2),
        lr: float = 0.1,
        reg_weight: float = 1.0,
        diffeomorphic: bool = True,
        integration_steps: int = 7,
        progress: bool = False,
        init: str = "network",
        pool_features: bool = False,
        regularise: str = "field",
        regulariser: str = "diffusion",
    ) -> None:
        self.regulariser = str(regulariser).lower()
        if self.regulariser not in ("diffusion", "bending"):
            raise ValueError(f"io_regulariser must be 'diffusion' or 'bending', got {regulariser!r}")
        self.regularise = str(regularise).lower()
        if self.regularise not in ("update", "field"):
            raise ValueError(f"io_regularise must be 'update' or 'field', got {regularise!r}")
        self.pool_features = config_flag(pool_features, "io_pool_features")
        self.init = str(init).lower()
        if self.init not in ("network", "identity"):
            raise ValueError(f"io_init must be 'network' or 'identity', got {init!r}")
        self.levels = [int(f) for f in (levels if isinstance(levels, Sequence) else [levels])]
        if not self.levels or min(self.levels) < 1:
            raise ValueError(f"io_levels must be grid factors >= 1, coarse to fine, got {levels!r}")
        its = [int(iterations)] * len(self.levels) if isinstance(iterations, (int, float)) else list(iterations)
        if len(its) != len(self.levels) or min(its) < 0:
            raise ValueError(
                f"io_iterations must be a number >= 0 or one per level ({len(self.levels)}), got {iterations!r}"
            )
        self.iterations = [int(i) for i in its]
        self.features, self.similarity = features, similarity
        self.lr, self.reg_weight = float(lr), float(reg_weight)
        self.diffeomorphic, self.integration_steps = config_flag(diffeomorphic, "diffeomorphic"), int(integration_steps)
        self.progress = bool(progress)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.smoothness = DiffusionLoss() if self.regulariser == "diffusion" else BendingEnergyLoss()
        self.last_seconds: list[float] = []

    @property
    def enabled(self) -> bool:
        """Whether any level runs an iteration."""
        return sum(self.iterations) > 0

    def _update(self, v: torch.Tensor, dvf2ddf: DVF2DDF | None) -> torch.Tensor:
        return dvf2ddf(v) if dvf2ddf is not None else v

    def _folding_penalty(self, u: torch.Tensor) -> torch.Tensor:
        # negative Jacobian determinants of x + u(x) (forward differences), for the plain displacement option
        grads = [torch.diff(u, dim=d, append=u.narrow(d, -1, 1)) for d in (2, 3, 4)]
        jac = torch.stack(grads, dim=2)  # [B, 3 (component), 3 (axis), ...]
        jac = jac + torch.eye(3, device=u.device, dtype=u.dtype).view(1, 3, 3, 1, 1, 1)
        det = torch.linalg.det(jac.permute(0, 3, 4, 5, 1, 2))
        return F.relu(-det).mean()

    def __call__(self, ddf: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ddf: the network's DDFs ``[B, 3, D, H, W]`` in voxels of the fixed grid (ignored with ``init="identity"``).
            moving: the moving images on the fixed grid ``[B, C, D, H, W]`` (what the network saw: refdrn's SR moving
                image, f3rnet's normalised CT or MR).
            fixed: the fixed images, same shape.

        Returns:
            the refined DDFs ``[B, 3, D, H, W]`` in voxels, float32, on ``ddf``'s device, each pair optimised on its
            own; ``ddf`` itself when ``iterations`` are all 0. ``last_seconds`` holds each level's wall time, summed
            over the batch.

        Raises:
            ValueError: the images and the DDFs are not on one grid, or not as many.
        """
        self.last_seconds = []
        if not self.enabled:
            return ddf
        if ddf.shape[2:] != moving.shape[2:] or moving.shape != fixed.shape or len(ddf) != len(moving):
            raise ValueError(
                f"IO needs the DDF {tuple(ddf.shape)} and the images {tuple(moving.shape)}, {tuple(fixed.shape)} "
                "on one grid"
            )
        refined, seconds = [], [0.0] * len(self.levels)
        for i in range(len(ddf)):
            refined.append(self._optimise(ddf[i : i + 1], moving[i : i + 1], fixed[i : i + 1]))
            seconds = [total + t for total, t in zip(seconds, self.last_seconds)]
        self.last_seconds = seconds
        return torch.cat(refined)

    def _optimise(self, ddf: torch.Tensor, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """One pair (``[1, ...]`` tensors, checked by ``__call__``); sets ``last_seconds`` to its levels' times."""
        self.last_seconds = []
        full = tuple(ddf.shape[2:])
        # contiguous: a channels-last field (the network's memory format) makes every warp and its backward slow
        d_net = (
            ddf.detach().float().contiguous() if self.init == "network" else torch.zeros(ddf.shape, device=ddf.device)
        )
        moving, fixed = moving.float().contiguous(), fixed.float().contiguous()
        dvf2ddf = DVF2DDF(num_steps=self.integration_steps, mode="bilinear", padding_mode="zeros")
        if self.pool_features:
            with torch.no_grad():
                moving, fixed = self.features(moving), self.features(fixed)
        v: torch.Tensor | None = None
        bar = None
        if self.progress:
            from tqdm import tqdm

            # one bar per pair over every level's iterations
            bar = tqdm(total=sum(self.iterations), desc="IO", unit="it", leave=False)
        with torch.enable_grad():
            for factor, iterations in zip(self.levels, self.iterations):
                start = time.perf_counter()
                grid = [max(1, s // factor) for s in full]
                if bar is not None:
                    bar.set_description(f"IO 1/{factor} grid {'x'.join(map(str, grid))}")
                with torch.no_grad():
                    if self.pool_features:  # the full-resolution features, average-pooled to the level's grid
                        f_moving, f_fixed = F.adaptive_avg_pool3d(moving, grid), F.adaptive_avg_pool3d(fixed, grid)
                    else:  # the features of the average-pooled images
                        f_moving = self.features(F.adaptive_avg_pool3d(moving, grid))
                        f_fixed = self.features(F.adaptive_avg_pool3d(fixed, grid))
                    net = resize_ddf(d_net, grid)
                    v0 = torch.zeros(1, 3, *grid, device=ddf.device) if v is None else resize_ddf(v.detach(), grid)
                v = v0.clone().requires_grad_(True)
                if iterations:
                    optimiser = torch.optim.Adam([v], lr=self.lr)
                    for _ in range(iterations):
                        optimiser.zero_grad(set_to_none=True)
                        u = self._update(v, dvf2ddf if self.diffeomorphic else None)
                        total = compose_ddf(u, net, self.warp)
                        warped = self.warp(f_moving, total)
                        smooth = self.smoothness(total if self.regularise == "field" else u)
                        loss = self.similarity(warped, f_fixed) + self.reg_weight * smooth
                        if not self.diffeomorphic:
                            loss = loss + self.reg_weight * self._folding_penalty(u)
                        loss.backward()
                        optimiser.step()
                        if bar is not None:
                            bar.update()
                self.last_seconds.append(time.perf_counter() - start)
            if bar is not None:
                bar.close()
            with torch.no_grad():
                u = resize_ddf(self._update(v.detach(), dvf2ddf if self.diffeomorphic else None), full)
                return compose_ddf(u, d_net, self.warp)
