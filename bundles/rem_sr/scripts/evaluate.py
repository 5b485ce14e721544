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

import io
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import decollate_batch
from monai.engines.utils import CommonKeys, IterationEvents
from monai.metrics import PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.utils import MetricReduction

from .common import BundleInputError, PerCaseMetric, atomic_write_bytes, case_name
from .degradation import degrade

__all__ = [
    "MaskedPSNRMetric",
    "MaskedSSIMMetric",
    "SRFigureHandler",
    "ForwardTimer",
    "check_method",
]

METHOD_LABELS = {"nearest": "NN", "trilinear": "Trilinear", "bspline": "B-spline", "rem": "REM"}


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


# ---------------------------------------------------------------------------------------------------- case names
# -------------------------------------------------------------------------------------------------------- figure
class SRFigureHandler:
    """Saves ``output_dir/sr_<method>_x<scale>.png`` for the FIRST case of the evaluation: axial, coronal and
    sagittal centre slices of the LR input (trilinearly upsampled), the method's output, the HR reference and the
    absolute error map, titled with the case's PSNR / SSIM inside the brain (the metric handlers' per-case values;
    the whole-volume values when the case has no mask). Written atomically at the end of the epoch.

    Args:
        output_dir: the folder of the figure.
        method: the evaluated method (``nearest``, ``trilinear``, ``bspline`` or ``rem``), for the title and name.
        scale: the degradation factor (2 or 4), for the title and the name; also the trilinear LR view's scale.
        psnr_key, ssim_key: the metrics shown in the title; fallbacks ``psnr``/``ssim`` when the case has no mask.
        error_max: the upper end of the error map's colour scale (intensity units; the volumes are in [0, 1]).
    """

    def __init__(
        self,
        output_dir: str,
        method: str,
        scale: float,
        psnr_key: str = "psnr_brain",
        ssim_key: str = "ssim_brain",
        error_max: float = 0.2,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = str(method)
        self.scale = float(scale)
        self.psnr_key, self.ssim_key = psnr_key, ssim_key
        self.error_max = error_max
        self._first: dict | None = None

    @property
    def filename(self) -> str:
        """``sr_<method>_x<scale>.png``, e.g. ``sr_rem_x4.png``."""
        return f"sr_{self.method}_x{self.scale:g}.png"

    def attach(self, engine: Engine) -> None:
        """Keep the first case's views at its iteration and save the figure at the end of the epoch."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._keep_first)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._save)

    def _reset(self, engine: Engine) -> None:
        self._first = None

    @staticmethod
    def _views(volume: np.ndarray) -> list[np.ndarray]:
        """Axial, coronal and sagittal centre slices of a [D, H, W] (RAS: x, y, z) volume, rotated for display."""
        c = [n // 2 for n in volume.shape]
        return [np.rot90(volume[:, :, c[2]]), np.rot90(volume[:, c[1], :]), np.rot90(volume[c[0], :, :])]

    def _keep_first(self, engine: Engine) -> None:
        if self._first is not None:
            return
        output = engine.state.output
        batch = engine.state.batch
        first = (
            output[0] if isinstance(output, list) else {k: v[0] for k, v in output.items() if k in ("pred", "label")}
        )
        item = batch[0] if isinstance(batch, list) else decollate_batch(batch, detach=True)[0]
        hr = torch.as_tensor(first["label"]).as_subclass(torch.Tensor).detach().float().cpu()
        pred = torch.as_tensor(first["pred"]).as_subclass(torch.Tensor).detach().float().cpu()
        lr = degrade(hr, self.scale, "trilinear").clamp(0.0, 1.0)
        hr, pred, lr = hr[0].numpy(), pred[0].numpy(), lr[0].numpy()
        self._first = {
            "case": case_name(item),
            "lr": self._views(lr),
            "pred": self._views(pred),
            "hr": self._views(hr),
            "error": self._views(np.abs(pred - hr)),
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
        label = METHOD_LABELS.get(self.method, self.method)
        columns = [
            (f"LR x{self.scale:g} (trilinear)", "lr", "gray", 1.0),
            (f"{label} x{self.scale:g}\n{psnr:.2f} dB / {ssim:.4f}", "pred", "gray", 1.0),
            ("HR reference", "hr", "gray", 1.0),
            (f"|{label} - HR|", "error", "inferno", self.error_max),
        ]
        names = ("axial", "coronal", "sagittal")
        fig, axes = plt.subplots(
            len(names),
            len(columns),
            figsize=(2.4 * len(columns) + 0.6, 2.6 * len(names)),
            squeeze=False,
            layout="constrained",
        )
        for col, (title, key, cmap, vmax) in enumerate(columns):
            for row, view_name in enumerate(names):
                ax = axes[row][col]
                image = ax.imshow(self._first[key][row], cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
                if col == 0:
                    ax.set_ylabel(view_name, fontsize=9)
            if key == "error":
                fig.colorbar(image, ax=[axes[r][col] for r in range(len(names))], shrink=0.6, label="absolute error")
        fig.suptitle(f"{self._first['case']}: {label} x{self.scale:g}, PSNR / SSIM {region}", fontsize=10)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.output_dir / self.filename, buffer.getvalue())
