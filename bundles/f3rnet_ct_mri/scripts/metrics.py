"""Label helper shared by validation (`engine.F3RNetEvalStep`) and the evaluation figure.

The evaluation's metrics themselves are MONAI metric handlers configured in ``configs/evaluate.json`` (Dice,
surface distances in mm, folding, SDlogJ: see ``registration_metrics.py``).
"""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot


def label_one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encoding of an integer label map, with stray ids mapped to background.

    Args:
        label: ``[B, 1, *spatial]`` label ids (any dtype; rounded).
        num_classes: number of classes including the background (ids ``0 .. num_classes - 1``).

    Returns:
        ``[B, num_classes, *spatial]`` float one-hot tensor (a plain ``torch.Tensor``); ids outside
        ``0 .. num_classes - 1`` count as background, so stray ids in user labels do not crash the metrics.
    """
    label = torch.as_tensor(label).as_subclass(torch.Tensor).round().long()
    label = torch.where((label >= 0) & (label < num_classes), label, torch.zeros_like(label))
    return one_hot(label, num_classes=num_classes, dim=1)
