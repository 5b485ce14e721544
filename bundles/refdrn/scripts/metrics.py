"""Registration metrics: label Dice, global NCC and the folding percentage (negative Jacobian determinant)."""

from __future__ import annotations

import torch


def mean_label_dice(warped: torch.Tensor, fixed: torch.Tensor, labels=None) -> float:
    """Mean Dice over the labels present in `fixed` (background 0 excluded), from one joint histogram
    (a per-label one-hot of 82 DK labels at 160x208x176 would need gigabytes)."""
    warped = torch.as_tensor(warped).long().flatten()
    fixed = torch.as_tensor(fixed).long().flatten()
    n = int(max(warped.max(), fixed.max())) + 1
    joint = torch.bincount(fixed * n + warped, minlength=n * n).reshape(n, n).double()
    intersection = joint.diag()
    size_fixed, size_warped = joint.sum(1), joint.sum(0)
    ids = torch.as_tensor(labels) if labels is not None else torch.nonzero(size_fixed).flatten()
    ids = ids[ids > 0]
    if ids.numel() == 0:
        return float("nan")
    dice = 2 * intersection[ids] / (size_fixed[ids] + size_warped[ids]).clamp_min(1)
    return float(dice.mean())


def global_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a displacement field [3, D, H, W] (voxel units), by central differences
    (one-sided at the borders)."""
    u = torch.as_tensor(ddf).double()
    grads = torch.stack([torch.stack(torch.gradient(u[i]), 0) for i in range(3)], 0)  # [3 (component), 3 (axis), ...]
    jac = grads + torch.eye(3, dtype=grads.dtype)[:, :, None, None, None]
    return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


def folding_percent(ddf: torch.Tensor) -> float:
    """Percentage of voxels whose Jacobian determinant is <= 0."""
    det = jacobian_determinant(ddf)
    return float((det <= 0).double().mean() * 100)
