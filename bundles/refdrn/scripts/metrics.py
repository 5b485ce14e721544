"""The label Dice of train.json's validation (``scripts.engine.RegistrationEvalStep``).

The evaluation (configs/evaluate.json) computes the same Dice with MONAI's ``MeanDice`` handler
(``DiceMetric`` with ``num_classes`` on label maps, background excluded, labels absent from the fixed map left
out); the tests check that the two agree. The other registration metrics live in ``registration_metrics``.
"""

from __future__ import annotations

import torch


def mean_label_dice(warped: torch.Tensor, fixed: torch.Tensor, labels=None) -> float:
    """Mean Dice over the labels of the fixed label map, background (0) excluded, from one joint histogram.

    A per-label one-hot of the 82 Desikan-Killiany labels at 160x208x176 would need gigabytes; the joint
    histogram of (fixed id, warped id) needs ``(max id + 1)^2`` counts.

    Args:
        warped: the warped moving label map (integer ids, any shape, e.g. ``[D, H, W]``).
        fixed: the fixed label map, same number of voxels as `warped`.
        labels: the label ids to average over; default: the ids present in `fixed`.

    Returns:
        the mean over the labels of ``2 |W_l ∩ F_l| / (|W_l| + |F_l|)`` (NaN when there is no foreground
        label).
    """
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
