"""What evaluate.json needs beyond MONAI: the brain-masked PSNR and SSIM, the forward time (a metric and the handler
that times the forward pass), the case names for MetricsSaver and the figure handler.

evaluate.json runs MONAI's ``SupervisedEvaluator`` over the test volumes: each HR volume is degraded with the
training degradation (trilinear downscaling by 1/scale, ``scripts.degradation``), upsampled back by the chosen
method (nearest, trilinear or cubic B-spline), passed through the method's network (REM, or the identity for the
interpolation baselines), clipped to [0, 1] and scored. The down-up protocol and the nearest/trilinear baselines
are those of K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical
Images" (Sections IV-A, IV-C, IV-D and Fig. 4).
"""

from __future__ import annotations

import math
import textwrap
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.engines.utils import CommonKeys, IterationEvents
from monai.metrics import PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.utils import MetricReduction

from . import figures
from .common import BundleInputError, PerCaseMetric, case_name
from .degradation import degradation_label, degradation_text, downsample

__all__ = [
    "MaskedPSNRMetric",
    "MaskedSSIMMetric",
    "SRFigureHandler",
    "ForwardTimer",
    "check_method",
    "capture_panels",
    "comparison_figure",
    "load_panels",
]

METHOD_LABELS = {
    "nearest": "Nearest",
    "trilinear": "Trilinear",
    "bspline": "Cubic B-spline",
    "rem_general": "REM, one model",
    "rem": "REM",
}
PANELS_FILE = "figure_panels.npz"
PLANES = ("axial", "coronal", "sagittal")
UNITS = "normalised intensity: background 0, 99.5th percentile 1"


def check_method(method: str, choices: Sequence[str]) -> str:
    """The evaluated method, if it is one the config knows.

    Args:
        method: the ``method`` config key (e.g. ``"rem"`` or ``"bspline"``).
        choices: the configured methods (the keys of ``method_upsampling``).

    Returns:
        `method`.

    Raises:
        BundleInputError: `method` is not in `choices`.
    """
    if method not in choices:
        raise BundleInputError(f"method must be one of {', '.join(choices)}; got {method!r}")
    return method


# ------------------------------------------------------------------------------------------------------ metrics
def _prediction_and_masked_reference(y_pred: torch.Tensor, y: torch.Tensor | None):
    """Check the shapes of the masked metrics' inputs and return plain tensors (prediction, reference, mask or None).

    Raises:
        ValueError: wrong shapes.
    """
    if y is None:
        raise ValueError("the masked metrics need the reference (and the mask) as y")
    y_pred = torch.as_tensor(y_pred).as_subclass(torch.Tensor)
    y = torch.as_tensor(y).as_subclass(torch.Tensor)
    if (
        y_pred.ndim < 3
        or y_pred.shape[1] != 1
        or y.shape[1] not in (1, 2)
        or y.shape[2:] != y_pred.shape[2:]
        or y.shape[0] != y_pred.shape[0]
    ):
        raise ValueError(
            f"expected y_pred [B, 1, *spatial] and y [B, 1 or 2, *spatial]; got {tuple(y_pred.shape)} "
            f"and {tuple(y.shape)}"
        )
    return y_pred, y[:, :1], (y[:, 1:] > 0 if y.shape[1] == 2 else None)


class MaskedPSNRMetric(PerCaseMetric):
    """PSNR over the voxels inside a mask (the brain): MONAI's ``PSNRMetric`` on the masked voxels only,
    ``20 log10(max_val) - 10 log10(mean((y - y_pred)^2 over the mask))``, in dB.

    The mask travels as the second channel of `y` (evaluate.json: ``ConcatItemsd(["label", "mask"])``); a case whose
    `y` has no second channel (the datalist item has no ``mask``) scores NaN, which ``aggregate`` leaves out.

    Args:
        max_val: the largest possible intensity (1.0 for REM's [0, 1] volumes).
        reduction: how ``aggregate`` reduces the per-case values (MONAI ``MetricReduction``, default mean).
        get_not_nans: ``aggregate`` also returns the number of non-NaN cases.
    """

    def __init__(
        self, max_val: float = 1.0, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False
    ) -> None:
        super().__init__(reduction, get_not_nans)
        self.max_val = max_val

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """
        Args:
            y_pred: the prediction [B, 1, *spatial] (intensities in [0, max_val]).
            y: the reference [B, 1, *spatial], with the mask as a second channel [B, 2, *spatial] (> 0: inside).

        Returns:
            the masked PSNR per case in dB, [B, 1] float32 (NaN without a mask; inf for a perfect prediction).

        Raises:
            ValueError: `y` missing or the shapes do not fit.
        """
        pred, ref, mask = _prediction_and_masked_reference(y_pred, y)
        values = []
        for b in range(pred.shape[0]):
            if mask is None:
                values.append(torch.full((1, 1), float("nan"), device=pred.device))
                continue
            sel = mask[b]
            # a fresh PSNRMetric per case: MONAI's own formula, without filling a second metric's buffer
            psnr = PSNRMetric(max_val=self.max_val)
            values.append(psnr(pred[b][sel].reshape(1, 1, -1), ref[b][sel].reshape(1, 1, -1)).float())
        return torch.cat(values, dim=0)


class MaskedSSIMMetric(PerCaseMetric):
    """SSIM averaged over a mask (the brain): MONAI's SSIM map (``compute_ssim_and_cs``, valid windows only, so it is
    ``win_size - 1`` voxels smaller per axis) averaged over the mask cropped the same way, i.e. over the windows
    centred inside the mask.

    As in :class:`MaskedPSNRMetric`, the mask is the second channel of `y`; NaN without one.
    Source: Z. Wang, A. C. Bovik, H. R. Sheikh and E. P. Simoncelli, "Image Quality Assessment: From Error Visibility
    to Structural Similarity" (the SSIM map), with MONAI's Gaussian window.

    Args:
        spatial_dims: 2 or 3.
        data_range: the intensity range (1.0 for REM's [0, 1] volumes).
        win_size: the Gaussian window size in voxels (odd).
        kernel_sigma: the Gaussian window's standard deviation in voxels.
        k1, k2: SSIM's stability constants.
        reduction: how ``aggregate`` reduces the per-case values (MONAI ``MetricReduction``, default mean).
        get_not_nans: ``aggregate`` also returns the number of non-NaN cases.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        data_range: float = 1.0,
        win_size: int = 11,
        kernel_sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ) -> None:
        super().__init__(reduction, get_not_nans)
        self.spatial_dims = spatial_dims
        self.data_range = data_range
        self.win_size = win_size
        self.kernel_sigma = kernel_sigma
        self.k1, self.k2 = k1, k2

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """
        Args:
            y_pred: the prediction [B, 1, *spatial] (``spatial_dims`` axes, intensities in [0, data_range]).
            y: the reference [B, 1, *spatial], with the mask as a second channel [B, 2, *spatial] (> 0: inside).

        Returns:
            the masked mean SSIM per case, [B, 1] float32 (NaN without a mask or with no window centred in it).

        Raises:
            ValueError: `y` missing, the shapes do not fit, or not ``spatial_dims`` spatial axes.
        """
        pred, ref, mask = _prediction_and_masked_reference(y_pred, y)
        if pred.ndim != self.spatial_dims + 2:
            raise ValueError(f"expected {self.spatial_dims} spatial axes, got y_pred of shape {tuple(pred.shape)}")
        if mask is None:
            return torch.full((pred.shape[0], 1), float("nan"), device=pred.device)
        ssim_map, _ = compute_ssim_and_cs(
            pred,
            ref,
            spatial_dims=self.spatial_dims,
            kernel_size=[self.win_size] * self.spatial_dims,
            kernel_sigma=[self.kernel_sigma] * self.spatial_dims,
            data_range=self.data_range,
            k1=self.k1,
            k2=self.k2,
        )
        half = self.win_size // 2
        inner = mask[(slice(None), slice(None)) + (slice(half, -half),) * self.spatial_dims]
        values = [ssim_map[b][inner[b]].mean().reshape(1, 1).float() for b in range(pred.shape[0])]
        return torch.cat(values, dim=0)


# ------------------------------------------------------------------------------------------------- forward time
class ForwardTimer:
    """Puts the forward time of each iteration into the engine output as ``"seconds"``: the wall time from the start
    of the iteration (moving the batch to the device) to MONAI's ``IterationEvents.FORWARD_COMPLETED`` (the end of
    the inferer's forward pass; CUDA synchronised), divided by the batch size. Read by
    ``scripts.common.PerCaseValueMetric``. The output is still one dict at that point; MONAI decollates it afterwards.
    """

    def __init__(self) -> None:
        self._start = 0.0

    def attach(self, engine: Engine) -> None:
        """Time every iteration of `engine` (a MONAI ``SupervisedEvaluator``, which fires ``FORWARD_COMPLETED``)."""
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._forward_completed)

    @staticmethod
    def _synchronize(engine: Engine) -> None:
        device = getattr(engine.state, "device", None)
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def _started(self, engine: Engine) -> None:
        self._synchronize(engine)
        self._start = time.perf_counter()

    def _forward_completed(self, engine: Engine) -> None:
        self._synchronize(engine)
        elapsed = time.perf_counter() - self._start
        output = engine.state.output
        n = len(output[CommonKeys.PRED])
        output["seconds"] = torch.full((n,), elapsed / n, dtype=torch.float32)


# -------------------------------------------------------------------------------------------------------- figures
def _plain(x) -> np.ndarray:
    """A tensor or MetaTensor as a float32 numpy array (metadata dropped)."""
    return torch.as_tensor(x).as_subclass(torch.Tensor).detach().float().cpu().numpy()


def _spacing_of(*images) -> np.ndarray:
    """The voxel size (mm per array axis) of the first of `images` that has an affine; 1 mm when none has."""
    for image in images:
        affine = getattr(image, "affine", None)
        if affine is not None:
            a = np.asarray(torch.as_tensor(affine).as_subclass(torch.Tensor).double().cpu())
            a = a[0] if a.ndim == 3 else a
            return np.sqrt((a[:3, :3] ** 2).sum(axis=0))
    return np.ones(3)


def _volume(x, name: str) -> np.ndarray:
    v = _plain(x)
    v = v[0] if v.ndim == 4 and v.shape[0] == 1 else v
    if v.ndim != 3:
        raise ValueError(f"{name}: expected a 3D volume [X, Y, Z] or [1, X, Y, Z], got shape {v.shape}")
    return v


def capture_panels(
    hr,
    pred,
    scale: float | Sequence[float],
    spacing: Sequence[float] | None = None,
    mask=None,
    profile: str = "none",
    gap: float = 0.0,
) -> dict[str, np.ndarray]:
    """The 2D panels of one case for the figures: the middle axial, coronal and sagittal slices of the HR reference,
    the method's output and the LR input, in the view convention of ``scripts.figures`` (radiological).

    The LR panel is the evaluated LR volume itself, on its own grid (``degradation.downsample``: the downscaling
    every method starts from, with the evaluation's slice profile and gap), sliced at the LR slice that holds the
    HR slice.

    Args:
        hr: the HR reference, [X, Y, Z] or [1, X, Y, Z], RAS-oriented, intensities in the normalised units.
        pred: the method's output on the HR grid, same shape.
        scale: the degradation factor (2 or 4), or one per RAS axis (``[1, 1, 4]``: thick slices).
        spacing: the HR voxel size in mm per RAS axis (1 mm when None).
        mask: the brain mask (> 0 inside), same shape as `hr`, or None.
        profile: the slice profile (``"none"``, ``"gaussian"``, ``"box"``), see ``degradation.downsample``.
        gap: the slice gap in HR voxels.

    Returns:
        ``hr_<plane>``, ``pred_<plane>``, ``lr_<plane>`` (float32 [rows, cols]), ``mask_<plane>`` (uint8, with a
        mask) and ``index_<plane>`` (the HR slice index) for each plane, and ``spacing``, ``lr_spacing`` (mm),
        ``hr_shape``, ``lr_shape`` (voxels).

    Raises:
        ValueError: a volume that is not 3D, or shapes that differ.
    """
    hr_v, pred_v = _volume(hr, "hr"), _volume(pred, "pred")
    mask_v = None if mask is None else _volume(mask, "mask") > 0
    if pred_v.shape != hr_v.shape or (mask_v is not None and mask_v.shape != hr_v.shape):
        raise ValueError(f"hr {hr_v.shape}, pred {pred_v.shape} and mask must have the same shape")
    scales = [float(scale)] * 3 if np.isscalar(scale) else [float(f) for f in scale]
    thickness = [f - gap if f > 1 else f for f in scales]
    lr_v = downsample(torch.from_numpy(hr_v)[None], scales, profile, thickness)[0].numpy()
    spacing = np.ones(3) if spacing is None else np.asarray(spacing, dtype=float)
    panels: dict[str, np.ndarray] = {
        "spacing": spacing,
        "lr_spacing": spacing * np.asarray(hr_v.shape) / np.asarray(lr_v.shape),
        "hr_shape": np.asarray(hr_v.shape),
        "lr_shape": np.asarray(lr_v.shape),
    }
    for plane in PLANES:
        axis = figures.PLANES[plane][0]
        index = figures.middle_index(hr_v.shape, plane)
        lr_index = min(int((index + 0.5) * lr_v.shape[axis] / hr_v.shape[axis]), lr_v.shape[axis] - 1)
        panels[f"index_{plane}"] = np.asarray(index)
        panels[f"hr_{plane}"] = figures.slice_view(hr_v, plane, index).astype(np.float32)
        panels[f"pred_{plane}"] = figures.slice_view(pred_v, plane, index).astype(np.float32)
        panels[f"lr_{plane}"] = figures.slice_view(lr_v, plane, lr_index).astype(np.float32)
        if mask_v is not None:
            panels[f"mask_{plane}"] = figures.slice_view(mask_v, plane, index).astype(np.uint8)
    return panels


def load_panels(path: str | Path) -> dict:
    """The panels an evaluation run saved (``figure_panels.npz``): the arrays of :func:`capture_panels` plus
    ``case``, ``method``, ``region`` (str), ``scale``, ``psnr`` (dB), ``ssim`` (float).

    Raises:
        BundleInputError: the file is missing or is not such an archive.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleInputError(f"{path}: figure panels not found; run the evaluation of this method again")
    try:
        data = figures.load_panels(path)
    except ValueError as e:
        raise BundleInputError(str(e)) from None
    missing = [k for k in ("case", "method", "scale", "psnr", "ssim", "hr_axial") if k not in data]
    if missing:
        raise BundleInputError(f"{path}: not a figure-panels archive (no {', '.join(missing)})")
    for key in ("case", "method", "region"):
        data[key] = str(data.get(key, ""))
    data["degradation"] = str(data.get("degradation", "")) or f"x{float(data['scale']):g} coarser"
    for key in ("scale", "psnr", "ssim"):
        data[key] = float(data[key])
    return data


def _save_panels(path: Path, panels: Mapping[str, np.ndarray], **info) -> Path:
    """`panels` and the scalars/strings of `info` as a compressed ``.npz``, written atomically."""
    return figures.save_panels(path, {**panels, **info})


def _box(panels: Mapping, plane: str, margin: float = 0.06, threshold: float = 0.02) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` (inclusive) of the HR panel's foreground (> `threshold`), widened by `margin` times
    its larger side (room for the orientation letters): the displayed part of every panel of `plane` (the empty
    background is left out)."""
    hr = panels[f"hr_{plane}"]
    rows, cols = np.nonzero(hr > threshold)
    if rows.size == 0:
        return 0, hr.shape[0] - 1, 0, hr.shape[1] - 1
    pad = max(2, int(round(margin * max(rows.max() - rows.min(), cols.max() - cols.min()))))
    r0, r1 = max(0, rows.min() - pad), min(hr.shape[0] - 1, rows.max() + pad)
    c0, c1 = max(0, cols.min() - pad), min(hr.shape[1] - 1, cols.max() + pad)
    return int(r0), int(r1), int(c0), int(c1)


def _show(ax, image: np.ndarray, panels: Mapping, plane: str, box, fontsize: float = 8, **style):
    """Draw `image` (an HR-grid or LR-grid panel of `plane`) over the HR panel's frame, cropped to `box`, at the
    physical aspect of the HR voxels, with the plane's orientation letters; returns the ``AxesImage``."""
    rows, cols = panels[f"hr_{plane}"].shape
    aspect = figures.view_aspect(panels["spacing"], plane)
    shown = ax.imshow(
        image, extent=(-0.5, cols - 0.5, rows - 0.5, -0.5), aspect=aspect, interpolation="nearest", **style
    )
    r0, r1, c0, c1 = box
    ax.set_xlim(c0 - 0.5, c1 + 0.5)
    ax.set_ylim(r1 + 0.5, r0 - 0.5)
    ax.set_xticks([])
    ax.set_yticks([])
    figures.mark_orientation(ax, plane, fontsize=fontsize)
    return shown


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 x 10^k at or above `value` (a readable colour-bar maximum)."""
    if not math.isfinite(value) or value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * power >= value * (1 - 1e-9))


def _metric_text(psnr: float, ssim: float) -> str:
    return "n/a" if math.isnan(psnr) else f"{psnr:.2f} dB, SSIM {ssim:.3f}"


def _panel_height(panels: Mapping, plane: str, width: float, box=None) -> float:
    """The height (inches) of a panel of `plane` `width` inches wide showing `box` (default: :func:`_box`)."""
    r0, r1, c0, c1 = box or _box(panels, plane)
    return width * (r1 - r0 + 1) * figures.view_aspect(panels["spacing"], plane) / (c1 - c0 + 1)


def _detail_box(box: tuple[int, int, int, int], fraction: float) -> tuple[int, int, int, int]:
    """The central `fraction` of `box` along each side (the enlarged detail of :func:`comparison_figure`)."""
    r0, r1, c0, c1 = box
    rows, cols = max(2, int(round((r1 - r0 + 1) * fraction))), max(2, int(round((c1 - c0 + 1) * fraction)))
    rc, cc = (r0 + r1 + 1) // 2, (c0 + c1 + 1) // 2
    return rc - rows // 2, rc - rows // 2 + rows - 1, cc - cols // 2, cc - cols // 2 + cols - 1


def comparison_figure(
    runs: Mapping[str, str | Path],
    path: str | Path,
    planes: Sequence[str] = ("axial", "coronal"),
    detail: str | None = "axial",
    detail_fraction: float = 0.4,
    error_max: float | None = None,
    error_percentile: float = 95.0,
    dpi: int = 120,
) -> Path | None:
    """One figure of the same case and scale across every evaluated method (``tools/compare_methods.py`` calls it
    once per grid point). Columns: the LR input (on its own grid), each method's output, the HR reference. For each
    plane, a row of images and below it the absolute error ``|method - HR|`` of each method, with one colour scale
    for every method and its colour bar (normalised intensity units: background 0, 99.5th percentile of the HR
    volume 1); then a row enlarging the centre of the `detail` plane (the box drawn on its HR panel) so that edges
    and small structures can be compared. Each method's title gives that case's PSNR (dB) and SSIM inside the brain
    mask (the whole volume without a mask). Every panel has its orientation letters (radiological view,
    ``scripts.figures``) and the physical aspect of the voxels, and is cropped to the head.

    Args:
        runs: method name -> that method's evaluation run folder, holding its ``figure_panels.npz``
            (:class:`SRFigureHandler`); drawn in this order.
        path: the PNG to write (atomically, ``figures.save_figure``).
        planes: the views, among ``axial``, ``coronal``, ``sagittal``.
        detail: the plane whose centre is enlarged in the last row (one of `planes`), or None for no detail row.
        detail_fraction: the enlarged part of the cropped panel, per side (0.4: 2.5 times larger).
        error_max: the top of the error colour scale; None: the `error_percentile` percentile of all methods'
            errors inside the brain (the head without a mask) in the drawn slices, rounded up to 1, 1.5, 2, 2.5, 3,
            4, 5, 6 or 8 x 10^k; larger errors show in the top colour.
        error_percentile: see `error_max` (95: the top 5% of the errors saturate, the rest keeps its contrast).
        dpi: the PNG's resolution.

    Returns:
        `path`, or None when `runs` is empty.

    Raises:
        BundleInputError: a run without readable panels, or runs of different cases, scales or slices (the message
            names the files).
        ValueError: `detail` is not one of `planes`.
    """
    if not runs:
        return None
    if detail is not None and detail not in planes:
        raise ValueError(f"detail must be one of the planes {list(planes)} or None, got {detail!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    files = {m: Path(folder) / PANELS_FILE for m, folder in runs.items()}
    data = {m: load_panels(f) for m, f in files.items()}
    methods = list(data)
    first = data[methods[0]]
    for m in methods[1:]:
        same = [first[k] == data[m][k] for k in ("case", "scale", "degradation")] + [
            np.array_equal(first[k], data[m][k]) for k in ("hr_shape", *(f"index_{p}" for p in planes))
        ]
        if not all(same):
            raise BundleInputError(
                f"{files[m]} ({data[m]['case']}, {data[m]['degradation']}) and {files[methods[0]]} ({first['case']}, "
                f"{first['degradation']}) show different cases, scales or slices; compare runs of one evaluation"
            )
    for plane in planes:
        if f"hr_{plane}" not in first:
            raise BundleInputError(f"{files[methods[0]]}: no {plane} panels (planes: {', '.join(PLANES)})")
    if error_max is None:
        errors = []
        for plane in planes:
            region = first.get(f"mask_{plane}", first[f"hr_{plane}"] > 0.02).astype(bool)
            errors += [np.abs(d[f"pred_{plane}"] - d[f"hr_{plane}"])[region] for d in data.values()]
        pooled = np.concatenate(errors)
        error_max = _nice_ceiling(float(np.percentile(pooled, error_percentile)) if pooled.size else 1.0)

    n_cols, width = len(methods) + 2, 2.35
    boxes = {plane: _box(first, plane) for plane in planes}
    rows = [(plane, kind) for plane in planes for kind in ("image", "error")]
    if detail is not None:
        boxes["detail"] = _detail_box(boxes[detail], detail_fraction)
        rows.append((detail, "detail"))
    heights = [
        _panel_height(first, plane, width, boxes["detail" if kind == "detail" else plane]) for plane, kind in rows
    ]
    fig, axes = plt.subplots(
        len(rows),
        n_cols,
        figsize=(n_cols * width, sum(heights) + 0.38 * len(rows) + 0.6),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
        layout="constrained",
    )
    lr_shape = "x".join(str(int(n)) for n in first["lr_shape"])
    lr_mm = "x".join(f"{v:.3g}" for v in first["lr_spacing"])
    for (plane, kind), row in zip(rows, axes):
        box = boxes["detail" if kind == "detail" else plane]
        where = f"{plane} slice {int(first[f'index_{plane}'])}"
        if kind == "error":
            row[0].axis("off")
            row[0].text(
                0.5,
                0.5,
                f"{plane}:\nabsolute error\nof each method\nagainst the HR\nreference\n(one colour scale)",
                ha="center",
                va="center",
                fontsize=10,
                transform=row[0].transAxes,
            )
            for c, m in enumerate(methods, start=1):
                error = np.abs(data[m][f"pred_{plane}"] - data[m][f"hr_{plane}"])
                shown = _show(row[c], error, first, plane, box, cmap="magma", vmin=0, vmax=error_max)
                row[c].set_title(f"|{METHOD_LABELS.get(m, m)} - HR|", fontsize=10)
            row[-1].axis("off")
            bar = row[-1].inset_axes([0.06, 0.06, 0.1, 0.88])
            fig.colorbar(shown, cax=bar, extend="max").ax.tick_params(labelsize=9)
            row[-1].text(
                0.45,
                0.5,
                f"|method - HR|\n{plane}\n\nnormalised\nintensity:\nHR background 0,\n99.5th pct 1\n\n"
                f"top of the scale:\n{error_percentile:g}th pct of the\nerrors in the brain",
                ha="left",
                va="center",
                fontsize=9,
                transform=row[-1].transAxes,
            )
            continue
        gray = dict(cmap="gray", vmin=0, vmax=1)
        _show(row[0], first[f"lr_{plane}"], first, plane, box, **gray)
        _show(row[-1], first[f"hr_{plane}"], first, plane, box, **gray)
        for c, m in enumerate(methods, start=1):
            _show(row[c], data[m][f"pred_{plane}"], first, plane, box, **gray)
        if kind == "detail":
            row[0].set_ylabel(f"{where}: centre, {1 / detail_fraction:g}x enlarged", fontsize=10)
            row[0].set_title("LR input", fontsize=10)
            row[-1].set_title("HR reference", fontsize=10)
            for c, m in enumerate(methods, start=1):
                row[c].set_title(METHOD_LABELS.get(m, m), fontsize=10)
            continue
        row[0].set_ylabel(where, fontsize=10)
        row[0].set_title(f"LR input, {first['degradation']}\n{lr_shape} at {lr_mm} mm", fontsize=10)
        row[-1].set_title("HR reference\n(ground truth)", fontsize=10)
        for c, m in enumerate(methods, start=1):
            row[c].set_title(
                f"{METHOD_LABELS.get(m, m)}\n{_metric_text(data[m]['psnr'], data[m]['ssim'])}", fontsize=10
            )
        if kind == "image" and plane == detail:
            r0, r1, c0, c1 = boxes["detail"]
            rect = Rectangle(
                (c0 - 0.5, r0 - 0.5), c1 - c0 + 1, r1 - r0 + 1, fill=False, edgecolor="cyan", linewidth=1.2
            )
            row[-1].add_patch(rect)
    region = first.get("region") or "inside the brain mask"
    lines = [
        f"{first['case']}: super-resolution of {first['degradation']} input, the same slices for every method "
        "(radiological view: the patient's right on the image's left)",
        f"titles: PSNR and SSIM of this case {region}; under each image row its absolute error |method - HR|",
    ]
    if detail:
        lines.append(f"last row: the centre of the {detail} slice (cyan box), {1 / detail_fraction:g}x enlarged")
    chars = int(n_cols * width * 72 / (0.55 * 12))  # about as many 12-point characters as the figure is wide
    fig.suptitle("\n".join(textwrap.fill(line, chars) for line in lines), fontsize=12)
    return figures.save_figure(fig, path, dpi=dpi)


class SRFigureHandler:
    """Saves the figure of the FIRST case of the evaluation, ``output_dir/sr_<method>_x<scale>.png``: axial, coronal
    and sagittal middle slices (radiological view with orientation letters, physical aspect, cropped to the head) of
    the LR input on its own grid, the method's output, the HR reference and the absolute error map, titled with the
    case's PSNR / SSIM inside the brain (the metric handlers' per-case values; the whole-volume values when the case
    has no mask). It also saves those panels with their metadata as ``output_dir/figure_panels.npz`` for
    :func:`comparison_figure`. Both are written atomically at the end of the epoch.

    Args:
        output_dir: the folder of the figure and the panels.
        method: the evaluated method (``nearest``, ``trilinear``, ``bspline`` or ``rem``), for the title and name.
        scale: the degradation factor (2 or 4) or one per RAS axis (``[1, 1, 4]``), for the title and the name
            (``degradation.degradation_label``); also the LR panel's factor.
        profile: the slice profile of the evaluation (``"auto"``: none for an isotropic scale, Gaussian otherwise).
        gap: the slice gap in HR voxels.
        psnr_key, ssim_key: the metrics shown in the title; fallbacks ``psnr``/``ssim`` when the case has no mask.
        error_max: the upper end of the error map's colour scale (normalised intensity units; the volumes are in
            [0, 1]).
    """

    def __init__(
        self,
        output_dir: str,
        method: str,
        scale: float | Sequence[float],
        psnr_key: str = "psnr_brain",
        ssim_key: str = "ssim_brain",
        error_max: float = 0.2,
        profile: str = "auto",
        gap: float = 0.0,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = str(method)
        self.scales = [float(scale)] * 3 if np.isscalar(scale) else [float(f) for f in scale]
        self.scale = max(self.scales)
        self.profile = profile if profile != "auto" else ("none" if np.isscalar(scale) else "gaussian")
        self.gap = float(gap)
        self.label = degradation_label(scale, profile, gap)
        self.text = degradation_text(scale, profile, gap)
        self.psnr_key, self.ssim_key = psnr_key, ssim_key
        self.error_max = error_max
        self._first: dict | None = None

    @property
    def filename(self) -> str:
        """``sr_<method>_<degradation>.png``, e.g. ``sr_rem_x4.png``, ``sr_rem_1x1x4.png``."""
        return f"sr_{self.method}_{self.label}.png"

    def attach(self, engine: Engine) -> None:
        """Keep the first case's panels at its iteration and save the figure and panels at the end of the epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    def _keep_first(self, engine: Engine) -> None:
        if self._first is not None:
            return
        output = engine.state.output
        batch = engine.state.batch
        first = (
            output[0] if isinstance(output, list) else {k: v[0] for k, v in output.items() if k in ("pred", "label")}
        )
        item = batch[0] if isinstance(batch, list) else decollate_batch(batch, detach=True)[0]
        mask = item.get("mask") if isinstance(item, Mapping) else None
        self._first = {
            "case": case_name(item),
            "panels": capture_panels(
                first["label"],
                first["pred"],
                self.scales,
                spacing=_spacing_of(first["label"], item.get("label"), item.get("image")),
                mask=mask,
                profile=self.profile,
                gap=self.gap,
            ),
        }

    def _first_case_value(self, engine: Engine, key: str) -> float:
        details = getattr(engine.state, "metric_details", {}) or {}
        if key not in details:
            return float("nan")
        values = torch.as_tensor(details[key]).reshape(-1)
        return float(values[0]) if values.numel() else float("nan")

    def _title_values(self, engine: Engine) -> tuple[str, float, float]:
        psnr, ssim = self._first_case_value(engine, self.psnr_key), self._first_case_value(engine, self.ssim_key)
        if math.isnan(psnr) and math.isnan(ssim):
            return "whole volume", self._first_case_value(engine, "psnr"), self._first_case_value(engine, "ssim")
        return "inside the brain mask", psnr, ssim

    def _save(self, engine: Engine) -> None:
        if self._first is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        region, psnr, ssim = self._title_values(engine)
        panels = self._first["panels"]
        _save_panels(
            self.output_dir / PANELS_FILE,
            panels,
            case=self._first["case"],
            method=self.method,
            scale=self.scale,
            degradation=self.text,
            region=region,
            psnr=psnr,
            ssim=ssim,
        )
        label = METHOD_LABELS.get(self.method, self.method)
        lr_shape = "x".join(str(int(n)) for n in panels["lr_shape"])
        columns = [
            (f"LR input, {self.text}\n{lr_shape} voxels", "lr", "gray", 1.0),
            (f"{label}\n{_metric_text(psnr, ssim)}", "pred", "gray", 1.0),
            ("HR reference", "hr", "gray", 1.0),
            (f"|{label} - HR|", "error", "magma", self.error_max),
        ]
        width = 2.6
        heights = [_panel_height(panels, plane, width) for plane in PLANES]
        fig, axes = plt.subplots(
            len(PLANES),
            len(columns),
            figsize=(width * len(columns) + 0.9, sum(heights) + 0.3 * len(PLANES) + 0.7),
            gridspec_kw={"height_ratios": heights},
            squeeze=False,
            layout="constrained",
        )
        for row, plane in enumerate(PLANES):
            box = _box(panels, plane)
            for col, (title, key, cmap, vmax) in enumerate(columns):
                image = (
                    np.abs(panels[f"pred_{plane}"] - panels[f"hr_{plane}"])
                    if key == "error"
                    else panels[f"{key}_{plane}"]
                )
                shown = _show(axes[row][col], image, panels, plane, box, cmap=cmap, vmin=0, vmax=vmax)
                if row == 0:
                    axes[row][col].set_title(title, fontsize=10)
                if col == 0:
                    axes[row][col].set_ylabel(f"{plane} slice {int(panels[f'index_{plane}'])}", fontsize=10)
            fig.colorbar(shown, ax=axes[row][-1], shrink=0.9).ax.tick_params(labelsize=8)
        fig.suptitle(
            f"{self._first['case']}: {label}, {self.text}; PSNR / SSIM {region}\n"
            f"error colour scale 0 to {self.error_max:g} ({UNITS})",
            fontsize=11,
        )
        figures.save_figure(fig, self.output_dir / self.filename, dpi=110)
