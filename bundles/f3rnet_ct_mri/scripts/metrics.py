"""Registration metrics: per-organ Dice and average surface distance (MONAI's DiceMetric and
SurfaceDistanceMetric, in mm via the voxel spacing), and the folding percentage of a DDF."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, SurfaceDistanceMetric
from monai.networks.utils import one_hot


def label_one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[B, 1, *spatial] integer label map -> [B, num_classes, *spatial] float one-hot (labels >= num_classes
    are dropped, so stray ids in user labels do not crash the metrics)."""
    label = torch.as_tensor(label).as_subclass(torch.Tensor).round().long()
    label = torch.where((label >= 0) & (label < num_classes), label, torch.zeros_like(label))
    return one_hot(label, num_classes=num_classes, dim=1)


def organ_dice(warped_label: torch.Tensor, fixed_label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Dice per organ (labels 1 .. num_classes-1) of one pair [1, 1, *spatial]; NaN where the organ is absent
    from the fixed label."""
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    values = metric(label_one_hot(warped_label, num_classes), label_one_hot(fixed_label, num_classes))
    return values[0].double().cpu().numpy()


def organ_asd(warped_label: torch.Tensor, fixed_label: torch.Tensor, num_classes: int,
              spacing: Sequence[float]) -> np.ndarray:
    """Symmetric average surface distance (mm) per organ of one pair; NaN where the organ is absent from the
    fixed label, inf where it is absent from the warped label."""
    metric = SurfaceDistanceMetric(include_background=False, symmetric=True, distance_metric="euclidean",
                                   reduction="none")
    pred, gt = label_one_hot(warped_label, num_classes), label_one_hot(fixed_label, num_classes)
    values = metric(pred, gt, spacing=[float(s) for s in spacing])[0].double().cpu().numpy()
    present = gt[0, 1:].flatten(1).any(1).cpu().numpy()
    predicted = pred[0, 1:].flatten(1).any(1).cpu().numpy()
    values[~present] = np.nan
    values[present & ~predicted] = np.inf
    return values


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """det(I + grad u) of a displacement field [3, D, H, W] (voxel units), by central differences
    (one-sided at the borders)."""
    u = torch.as_tensor(ddf).as_subclass(torch.Tensor).double()
    grads = torch.stack([torch.stack(torch.gradient(u[i]), 0) for i in range(3)], 0)  # [3 (component), 3 (axis), ...]
    jac = grads + torch.eye(3, dtype=grads.dtype)[:, :, None, None, None]
    return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


def folding_percent(ddf: torch.Tensor) -> float:
    """Percentage of voxels whose Jacobian determinant is <= 0 (folding)."""
    det = jacobian_determinant(ddf)
    return float((det <= 0).double().mean() * 100)
