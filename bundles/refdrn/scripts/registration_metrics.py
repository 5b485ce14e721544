"""Registration metrics that MONAI lacks, as MONAI ``CumulativeIterationMetric`` classes, plus surface
distances in millimetres.

- Folding: the percentage of voxels whose Jacobian determinant of ``x -> x + u(x)`` is <= 0.
- SDlogJ: the standard deviation of the log Jacobian determinant, as the Learn2Reg challenge reports it
  (Hering et al., "Learn2Reg: comprehensive multi-task medical image registration challenge, dataset and
  evaluation in the era of deep learning", IEEE TMI 2022): determinants clipped to [1e-9, 1e9] before the log.
- HD95 and ASD in mm: MONAI's ``HausdorffDistanceMetric`` (percentile 95) and ``SurfaceDistanceMetric``
  (symmetric), given the voxel spacing read from the label's affine, since MONAI's metric handlers do not
  pass a ``spacing`` argument. With ``num_classes`` they also take label maps (``[B, 1, X, Y, Z]`` label ids)
  and build one binary mask per label at a time, so 80+ brain labels need no one-hot volume in memory.
  A label absent from the reference ``y`` gives NaN (left out of the mean, as MONAI's ``DiceMetric`` does
  with ``ignore_empty``); a label present in ``y`` but absent from ``y_pred`` gives inf (MONAI's convention for
  the maximum; its percentile HD would give NaN).
- Global NCC: the normalised cross-correlation of two whole images (one value per case).

The per-case base class and the per-case value collector (the forward time) are ``PerCaseMetric`` and
``PerCaseValueMetric`` in ``common.py``, which every bundle carries.

Every metric takes ``(y_pred, y)`` batch-first tensors or lists of channel-first tensors, as MONAI's
``IgniteMetricHandler`` passes them, so they plug into an evaluator's ``additional_metrics`` and into
``MetricsSaver``.

This file is a deliberate, identical copy in ``bundles/refdrn/scripts`` and ``bundles/f3rnet_ct_mri/scripts``
(each bundle must work when copied out on its own). Edit the refdrn copy and run ``python tools/sync_common.py``;
``tests/test_common_copies.py`` fails while the copies differ.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.metrics import HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.metrics.hausdorff_distance import compute_hausdorff_distance
from monai.metrics.surface_distance import compute_average_surface_distance
from monai.metrics.utils import prepare_spacing

from .common import PerCaseMetric

__all__ = [
    "FoldingMetric",
    "GlobalNCCMetric",
    "PhysicalHausdorffDistanceMetric",
    "PhysicalSurfaceDistanceMetric",
    "SDlogJMetric",
    "folding_percent",
    "global_ncc",
    "jacobian_determinant",
    "sdlogj",
    "voxel_spacing",
]


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Jacobian determinant ``det(I + grad u)`` of a dense displacement field (DDF).

    Args:
        ddf: ``[3, X, Y, Z]`` (or ``[1, 3, X, Y, Z]``) displacements in voxels, channel ``i`` along spatial axis
            ``i``, as MONAI's ``Warp`` reads them.

    Returns:
        ``[X, Y, Z]`` float64 determinants; central differences inside, one-sided at the borders
        (``torch.gradient``).

    Raises:
        ValueError: `ddf` is not a 3-channel 3D field.
    """
    u = torch.as_tensor(ddf).as_subclass(torch.Tensor).detach().double().cpu()
    if u.ndim == 5 and u.shape[0] == 1:
        u = u[0]
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"expected a DDF of shape [3, X, Y, Z], got {tuple(u.shape)}")
    grads = torch.stack([torch.stack(torch.gradient(u[i]), 0) for i in range(3)], 0)  # [component, axis, ...]
    jac = grads + torch.eye(3, dtype=grads.dtype)[:, :, None, None, None]
    return torch.linalg.det(jac.permute(2, 3, 4, 0, 1))


def folding_percent(ddf: torch.Tensor) -> float:
    """Percentage (0-100) of voxels whose Jacobian determinant is <= 0. `ddf` as in `jacobian_determinant`."""
    return float((jacobian_determinant(ddf) <= 0).double().mean() * 100)


def sdlogj(ddf: torch.Tensor) -> float:
    """Standard deviation of ``log(det J)``, determinants clipped to [1e-9, 1e9] (Learn2Reg's SDlogJ).

    `ddf` as in `jacobian_determinant`. 0 for the identity; smooth fields give about 0.05-0.2.
    """
    det = jacobian_determinant(ddf).clamp(1e-9, 1e9)
    return float(torch.log(det).std(correction=0))  # population std, as Learn2Reg's np.std


def voxel_spacing(image: Any, ndim: int = 3) -> list[float] | None:
    """Voxel spacing (mm) of a MONAI ``MetaTensor`` from its affine (column norms), or None for a plain tensor."""
    affine = getattr(image, "affine", None)
    if affine is None or not hasattr(image, "meta"):
        return None
    affine = torch.as_tensor(affine).double()
    if affine.ndim == 3:
        affine = affine[0]
    return [float(v) for v in torch.linalg.norm(affine[:ndim, :ndim], dim=0)]


def global_ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Global normalised cross-correlation of two images, in float64.

    Args:
        a: an image of any shape (e.g. ``[1, X, Y, Z]``), any intensity unit.
        b: an image with as many voxels as `a`.

    Returns:
        ``sum((a - mean a)(b - mean b)) / (||a - mean a|| ||b - mean b||)`` in [-1, 1]; 0 when either image is
        constant.
    """
    a = torch.as_tensor(a).as_subclass(torch.Tensor).detach().double().cpu().flatten()
    b = torch.as_tensor(b).as_subclass(torch.Tensor).detach().double().cpu().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


class _PerCaseMetric(PerCaseMetric):
    """Base class: one value per case from ``value(y_pred[i], y[i])``, averaged over cases by `aggregate`."""

    def value(self, y_pred: torch.Tensor, y: torch.Tensor | None) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """``y_pred`` (and ``y``, if given): batch-first ``[B, ...]``; returns ``[B, 1]`` float64."""
        cases = torch.as_tensor(y_pred)
        refs = [None] * len(cases) if y is None else torch.as_tensor(y)
        return torch.tensor([[self.value(p, r)] for p, r in zip(cases, refs)], dtype=torch.float64)


class _PerCaseDDFMetric(_PerCaseMetric):
    """Base class: one value per case from the DDF ``y_pred`` (``y`` is ignored), averaged by `aggregate`."""

    def value(self, ddf: torch.Tensor, y: torch.Tensor | None = None) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


class FoldingMetric(_PerCaseDDFMetric):
    """Percentage of folding voxels (det J <= 0) per case, from ``y_pred`` = DDF ``[B, 3, X, Y, Z]`` (voxels).

    Example::

        metric = FoldingMetric()
        metric(torch.zeros(1, 3, 8, 8, 8))
        metric.aggregate()  # tensor(0.)
    """

    def value(self, ddf: torch.Tensor, y: torch.Tensor | None = None) -> float:
        """`folding_percent` of one DDF ``[3, X, Y, Z]`` (`y` is ignored)."""
        return folding_percent(ddf)


class SDlogJMetric(_PerCaseDDFMetric):
    """Learn2Reg's SDlogJ per case, from ``y_pred`` = DDF ``[B, 3, X, Y, Z]`` (voxels); see `sdlogj`."""

    def value(self, ddf: torch.Tensor, y: torch.Tensor | None = None) -> float:
        """`sdlogj` of one DDF ``[3, X, Y, Z]`` (`y` is ignored)."""
        return sdlogj(ddf)


class GlobalNCCMetric(_PerCaseMetric):
    """Global NCC per case (`global_ncc`) of ``y_pred`` (e.g. the warped moving image) against ``y`` (the fixed
    image), both ``[B, C, X, Y, Z]``; `aggregate` averages over cases.

    Example::

        metric = GlobalNCCMetric()
        image = torch.rand(1, 1, 8, 8, 8)
        metric(image, 2 * image + 1)
        metric.aggregate()  # tensor(1., dtype=torch.float64)
    """

    def value(self, y_pred: torch.Tensor, y: torch.Tensor | None) -> float:
        """`global_ncc` of one case.

        Raises:
            ValueError: no reference image `y`.
        """
        if y is None:
            raise ValueError("GlobalNCCMetric needs the reference image y")
        return global_ncc(y_pred, y)


def _label_boxes(label_map: torch.Tensor, num_classes: int) -> list:
    """Bounding boxes (tuples of slices, None when absent) of the label ids 1..num_classes-1 of a label map."""
    from scipy.ndimage import find_objects

    ids = label_map.detach().cpu().numpy()
    boxes = find_objects(np.rint(ids).astype(np.int64).clip(0, num_classes), max_label=num_classes - 1)
    return [None, *boxes]  # index = label id; id 0 (background) has no box


def _union_box(a, b, shape, margin: int = 1) -> tuple:
    """The smallest box holding boxes `a` and `b` (either may be None), grown by `margin` voxels."""
    boxes = [x for x in (a, b) if x is not None]
    return tuple(
        slice(max(min(x[i].start for x in boxes) - margin, 0), min(max(x[i].stop for x in boxes) + margin, s))
        for i, s in enumerate(shape)
    )


def _surface_metric(
    compute,
    y_pred: torch.Tensor,
    y: torch.Tensor,
    num_classes: int | None,
    include_background: bool,
    ignore_index: int | None,
    spacing,
) -> torch.Tensor:
    """``[B, C]`` values of ``compute(pred_mask, ref_mask, spacing)`` per case and label, NaN where the label
    is absent from `y` (or is `ignore_index`).

    Label maps (``[B, 1, ...]`` ids, `num_classes` given) are turned into one binary mask per label at a time,
    cropped to the label's bounding box in both maps plus one voxel (MONAI crops to that box itself, so the
    values are unchanged); one-hot inputs (``[B, C, ...]``) are used channel by channel. `compute` is MONAI's
    ``compute_hausdorff_distance`` or ``compute_average_surface_distance`` with its options bound.
    """
    pred = torch.as_tensor(y_pred).as_subclass(torch.Tensor).detach()
    ref = torch.as_tensor(y).as_subclass(torch.Tensor).detach()
    label_maps = num_classes is not None and pred.shape[1] == 1 and ref.shape[1] == 1
    if not label_maps and pred.shape != ref.shape:
        raise ValueError(f"y_pred and y should have same shapes, got {tuple(pred.shape)} and {tuple(ref.shape)}")
    n = int(num_classes) if label_maps else pred.shape[1]
    first = 0 if include_background else 1
    out = torch.full((pred.shape[0], max(n - first, 0)), float("nan"), dtype=torch.float32)
    spacings = prepare_spacing(spacing=spacing, batch_size=pred.shape[0], img_dim=pred.ndim - 2)
    for b in range(pred.shape[0]):
        if label_maps:
            shape = tuple(ref.shape[2:])
            ref_boxes, pred_boxes = _label_boxes(ref[b, 0], n), _label_boxes(pred[b, 0], n)
        for c in range(first, n):
            if ignore_index is not None and c == ignore_index:
                continue
            if label_maps:
                if c > 0 and ref_boxes[c] is None:
                    continue  # label absent from the reference: NaN
                box = _union_box(ref_boxes[c], pred_boxes[c], shape) if c > 0 else tuple(slice(None) for _ in shape)
                ref_mask, pred_mask = ref[b, 0][box] == c, pred[b, 0][box] == c
            else:
                ref_mask, pred_mask = ref[b, c].bool(), pred[b, c].bool()
            if not ref_mask.any():
                continue  # label absent from the reference: NaN
            if not pred_mask.any():
                out[b, c - first] = float("inf")  # label lost by the prediction (MONAI's percentile HD gives NaN)
                continue
            out[b, c - first] = compute(pred_mask[None, None], ref_mask[None, None], spacings[b]).reshape(())
    return out


class PhysicalHausdorffDistanceMetric(HausdorffDistanceMetric):
    """MONAI's ``HausdorffDistanceMetric`` in mm: the spacing comes from the affine of ``y`` (a ``MetaTensor``).

    With ``percentile=95`` this is HD95, as Learn2Reg reports it (Hering et al., "Learn2Reg: comprehensive
    multi-task medical image registration challenge, dataset and evaluation in the era of deep learning",
    IEEE TMI 2022). ``y_pred`` and ``y`` are one-hot ``[B, C, X, Y, Z]`` label maps (or lists of
    ``[C, X, Y, Z]``), or, with `num_classes`, label-id maps ``[B, 1, X, Y, Z]``. A plain tensor ``y`` gives
    voxel units. A label absent from ``y`` gives NaN; one absent from ``y_pred`` only gives inf.

    Args:
        args: MONAI's ``HausdorffDistanceMetric`` arguments (``include_background``, ``distance_metric``,
            ``percentile``, ``directed``, ``reduction``, ``get_not_nans``, ``ignore_index``).
        num_classes: the number of label ids (background 0 included) when the inputs are label-id maps.
        kwargs: as `args`.

    Example::

        metric = PhysicalHausdorffDistanceMetric(percentile=95, num_classes=83)  # label ids 0..82
        metric(warped_label, fixed_label)  # [B, 1, X, Y, Z] each, fixed_label a MetaTensor with its affine
        metric.aggregate()  # mean over labels, then over cases, in mm
    """

    def __init__(self, *args: Any, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """``[B, C]`` distances in mm (C: the labels, background excluded unless ``include_background``)."""
        spacing = kwargs.get("spacing")
        spacing = voxel_spacing(y) if spacing is None else spacing

        def compute(pred, ref, spacing):
            return compute_hausdorff_distance(
                pred,
                ref,
                include_background=True,
                distance_metric=self.distance_metric,
                percentile=self.percentile,
                directed=self.directed,
                spacing=spacing,
            )

        return _surface_metric(
            compute, y_pred, y, self.num_classes, self.include_background, getattr(self, "ignore_index", None), spacing
        )


class PhysicalSurfaceDistanceMetric(SurfaceDistanceMetric):
    """MONAI's ``SurfaceDistanceMetric`` (average surface distance, ASD) in mm, spacing from ``y``'s affine.

    Inputs and empty labels as `PhysicalHausdorffDistanceMetric`; ``symmetric=True`` averages the distances of
    both surfaces to each other (the symmetric ASD).

    Args:
        args: MONAI's ``SurfaceDistanceMetric`` arguments (``include_background``, ``symmetric``,
            ``distance_metric``, ``reduction``, ``get_not_nans``, ``ignore_index``).
        num_classes: the number of label ids (background 0 included) when the inputs are label-id maps.
        kwargs: as `args`.
    """

    def __init__(self, *args: Any, num_classes: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_classes = num_classes

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        """``[B, C]`` distances in mm (C: the labels, background excluded unless ``include_background``)."""
        spacing = kwargs.get("spacing")
        spacing = voxel_spacing(y) if spacing is None else spacing

        def compute(pred, ref, spacing):
            return compute_average_surface_distance(
                pred,
                ref,
                include_background=True,
                symmetric=self.symmetric,
                distance_metric=self.distance_metric,
                spacing=spacing,
            )

        return _surface_metric(
            compute, y_pred, y, self.num_classes, self.include_background, getattr(self, "ignore_index", None), spacing
        )
