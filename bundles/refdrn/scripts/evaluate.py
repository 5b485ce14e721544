"""What MONAI lacks for this bundle's evaluation (configs/evaluate.json, an override of train.json).

The evaluation runs MONAI's ``SupervisedEvaluator`` over the held-out pairs for ONE method (``--method``), the
rows of Table III/IV of Sun & Simon, "A Resolution Enhancement Plug-in for Deformable Registration of Medical
Images": ``identity`` (no registration, a zero DDF: `ZeroDDF`), ``backbone_lr`` (the plain backbone on
trilinear-upsampled LR input), ``cascade`` (REM + backbone, the shipped model) and ``cascade_no_aux`` (the
cascade trained without the auxiliary loss). Metrics are MONAI metric handlers (Dice) and ``IgniteMetricHandler``
around the metrics of ``registration_metrics`` (HD95, ASD, NCC, folding, SDlogJ, seconds) and
`ChannelMeanPSNRMetric`; ``MetricsSaver`` writes the per-case values and their summary.

This module holds the pieces MONAI has no equivalent for:

- `method_network`: the network of a method (the bundle's cascade, or the zero-DDF baseline);
- `check_method`: one clear error for an unknown ``--method``;
- `RegistrationEvaluateStep`: the evaluator's iteration (one timed forward pass of the cascade per pair);
- `ChannelMeanPSNRMetric`: the PSNR of each channel (moving, fixed), averaged;
- `RegistrationFigureHandler`: the figure of the first pair (`method_figure`) and its panels (`figure_panels`,
  ``figure_panels.npz``);
- `comparison_figure`: the same pair across methods, from the runs' ``figure_panels.npz`` (called by
  ``tools/compare_methods.py``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.engines.utils import IterationEvents
from monai.metrics import PSNRMetric
from torch import nn

from . import figures
from .common import BundleInputError, case_name, unwrap
from .networks import RegistrationCascade, build_registration_network
from .registration_metrics import jacobian_determinant, voxel_spacing

__all__ = [
    "ChannelMeanPSNRMetric",
    "RegistrationEvaluateStep",
    "RegistrationFigureHandler",
    "ZeroDDF",
    "check_method",
    "comparison_figure",
    "figure_panels",
    "load_panels",
    "method_figure",
    "method_network",
    "save_panels",
]


class ZeroDDF(nn.Module):
    """The identity baseline's "backbone": a zero DDF for any pair (no registration, no parameters).

    Source: the "Affine" (no deformable registration) column of Table III of Sun & Simon; the sample pairs are
    already affinely aligned.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: the pair stacked as channels, ``[B, 2, D, H, W]``.

        Returns:
            zeros ``[B, 3, D, H, W]`` (a DDF in voxels) of the dtype and device of `x`.
        """
        return x.new_zeros((x.shape[0], 3, *x.shape[2:]))


def method_network(
    backbone: str = "fdrn",
    rem: nn.Module | None = None,
    fdrn_channels: Sequence[int] = (16, 32, 32, 32, 32),
    fdrn_num_res: int = 2,
    rem_inferer=None,
) -> RegistrationCascade:
    """The network of one evaluated method (the ``network_def`` of evaluate.json).

    Args:
        backbone: ``"zero"`` for the identity baseline (`ZeroDDF`, no REM), else a backbone of
            ``scripts.networks.build_registration_network`` (``"fdrn"``, ``"voxelmorph"``).
        rem: the frozen REM, or None (the backbone on trilinear-upsampled input).
        fdrn_channels: FDRN widths per level; ignored for the other backbones.
        fdrn_num_res: FDRN residual units per stage; ignored for the other backbones.
        rem_inferer: runs REM at inference (``scripts.fast_inference.HaloSlidingWindowInferer``: window by window,
            the full-volume result); ``None``: REM on the whole volume.

    Returns:
        a ``RegistrationCascade``: ``forward`` maps the LR pair ``[B, 2, D, H, W]`` to a DDF ``[B, 3, D, H, W]``
        (voxels), ``forward(x, return_dict=True)`` also gives the network's input images (``sr_moving``,
        ``sr_fixed``: REM's outputs, or the trilinear-upsampled LR images without REM).

    Raises:
        ValueError: unknown backbone (see ``build_registration_network``).
    """
    if str(backbone).lower() == "zero":
        return RegistrationCascade(ZeroDDF(), rem, rem_inferer=rem_inferer)  # REM kept: IO from identity uses its SR
    return build_registration_network(
        backbone, rem, fdrn_channels=fdrn_channels, fdrn_num_res=fdrn_num_res, rem_inferer=rem_inferer
    )


def check_method(method: str, methods: Mapping) -> str:
    """`method` if it is a key of `methods` (evaluate.json's per-method settings).

    Raises:
        BundleInputError: unknown method; the message lists the known ones.
    """
    if method not in methods:
        raise BundleInputError(f"unknown --method {method!r}; choose one of {', '.join(methods)}")
    return method


def _plain(x) -> torch.Tensor:
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class RegistrationEvaluateStep:
    """The evaluator's iteration: one timed forward pass of the method's network on each pair.

    The batch (``validate#preprocessing`` of train.json) holds the HR images ``moving_image``/``fixed_image``,
    their down-up degraded copies ``moving_image_lr``/``fixed_image_lr`` (the network's input) and the label
    maps ``moving_label``/``fixed_label`` (``[B, 1, D, H, W]`` each). The output, on the CPU, is

    - ``pred``: the DDF ``[B, 3, D, H, W]`` in voxels (MONAI ``Warp`` convention), with the fixed image's meta;
    - ``sr_moving``, ``sr_fixed``: the network's input images ``[B, 1, D, H, W]`` (REM's outputs, or the
      trilinear-upsampled LR images for methods without REM);
    - ``fixed_image``, ``fixed_label``: the references of the metrics (HR fixed image, fixed label map);
    - ``seconds``: ``[B]`` the forward time per pair (the batch's time divided by its size), in seconds.

    MONAI's decollation and ``evaluate#postprocessing`` (warping the moving label and image) then run on
    ``IterationEvents.MODEL_COMPLETED``, which this step fires like MONAI's default iteration.

    Args:
        num_classes: label ids must be below this (the ``num_classes`` of the Dice/HD95/ASD metrics); None: no
            check. evaluate.json's datalist check (``scripts.pairs.check_pairs``) already refuses such ids before
            anything runs; this guards the step when it is used on its own.
        io: ``scripts.instance_optimisation.InstanceOptimisation`` run on the network's field on the SR pair (its
            time included in ``seconds``; the rows "cascade_io" and "io_from_identity"), or ``None``.

    Raises:
        BundleInputError: (on a call) a label map holds an id >= `num_classes`; the message names the file.
    """

    def __init__(self, num_classes: int | None = None, io=None) -> None:
        self.num_classes = num_classes
        self.io = io

    def check_labels(self, batch: Mapping) -> None:
        """Raise a BundleInputError naming the label file when its largest id is >= ``num_classes`` (any id fits the
        warped label map: ``scripts.pairs.WarpMovingd`` picks uint8, int16 or int32)."""
        for key in ("moving_label", "fixed_label"):
            labels = batch[key]
            top = int(_plain(labels).max())
            files = getattr(labels, "meta", {}).get("filename_or_obj", key)
            if self.num_classes is not None and top >= self.num_classes:
                raise BundleInputError(
                    f"{files}: label id {top} >= num_classes {self.num_classes}; "
                    f"set --num_classes to the largest label id + 1"
                )

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> list | dict:
        """Run the network on ``batch``; returns the (decollated, post-processed) output described above."""
        self.check_labels(batch)
        device = engine.state.device
        fixed_lr = batch["fixed_image_lr"]
        pair = torch.cat([_plain(batch["moving_image_lr"]), _plain(fixed_lr)], dim=1).to(device)
        network = unwrap(engine.network)
        network.eval()
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=bool(getattr(engine, "amp", False))):
            # through the evaluator's inferer, as inference.json (inference mode, bf16 on the CPU: `precision`)
            out = engine.inferer(pair, network, return_dict=True)
        if self.io is not None and self.io.enabled:
            # instance optimisation of the network's field on the SR pair (the rows "+ IO" and "IO from identity")
            out["ddf"] = self.io(out["ddf"].float(), out["sr_moving"], out["sr_fixed"])
        _sync(device)
        seconds = time.perf_counter() - start

        def with_meta(x: torch.Tensor) -> MetaTensor:
            # outputs live on the fixed image's grid: give them its (batched) affine and file name
            wrapped = MetaTensor(x.detach().float().cpu(), meta=fixed_lr.meta, applied_operations=[])
            wrapped.is_batch = True
            return wrapped

        engine.state.output = {
            "pred": with_meta(out["ddf"]),
            "sr_moving": with_meta(out["sr_moving"]),
            "sr_fixed": with_meta(out["sr_fixed"]),
            "fixed_image": batch["fixed_image"],
            "fixed_label": batch["fixed_label"],
            "seconds": torch.full((pair.shape[0],), seconds / pair.shape[0], dtype=torch.float64),
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI's decollation and postprocessing
        return engine.state.output


class ChannelMeanPSNRMetric(PSNRMetric):
    """PSNR of each channel, averaged over the channels (MONAI's ``PSNRMetric`` pools the channels' MSE instead).

    ``y_pred``/``y``: ``[B, C, ...]`` images with intensities in [0, `max_val`]; here C = 2, the network's
    input images (moving, fixed) against the HR images, so a case's value is the mean of the two images'
    PSNRs (dB).

    Args:
        max_val: the intensity range (1.0 for these images).
        reduction, get_not_nans: as MONAI's ``PSNRMetric``.
    """

    def _compute_metric(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` mean over channels of the per-channel PSNR (dB)."""
        per_channel = []
        for c in range(y_pred.shape[1]):
            per_channel.append(super()._compute_metric(y_pred[:, c : c + 1], y[:, c : c + 1]))
        return torch.stack(per_channel, 0).mean(0)


# ------------------------------------------------------------------------------------------------------- figures
# the views of the figures (scripts.figures: radiological, RAS arrays)
FIGURE_PLANES = ("axial", "coronal")
# 2D panels of one plane in figure_panels.npz, stored as "<plane>_<panel>"
PANEL_NAMES = (
    "fixed",
    "moving",
    "warped",
    "fixed_label",
    "moving_label",
    "warped_label",
    "ddf_row",
    "ddf_col",
    "jacobian",
)
# the per-case metric values kept with the panels (NaN when the run did not compute one)
CASE_VALUES = ("dice", "hd95", "folding_percent")
PANELS_FILE = "figure_panels.npz"
# colour scale of the Jacobian determinant: centred on 1 (no volume change), clipped at 0 and 2
JACOBIAN_LIMITS = (0.0, 2.0)
FIXED_CONTOUR = "#ff4b4b"
MOVING_CONTOUR = "#33c7ff"
GRID_COLOR = "#7dff6e"
FOLDING_COLOR = "#ff00ff"
FONT = 8  # titles and labels (pt); orientation letters and colour-bar ticks 7 pt
PANEL_INCHES = 1.9  # width of one image panel


def _ras_spacing(image) -> list[float] | None:
    """Voxel spacing (mm) of a RAS-oriented MetaTensor (None for a plain array).

    Raises:
        ValueError: the image's affine is not RAS-oriented (the figure views assume RAS arrays).
    """
    affine = getattr(image, "affine", None)
    if affine is None:
        return None
    affine = np.asarray(_plain(affine).double())
    codes = "".join(nib.aff2axcodes(affine[0] if affine.ndim == 3 else affine))
    if codes != "RAS":
        raise ValueError(f"the registration figure needs RAS-oriented volumes (Orientationd('RAS')), got {codes}")
    return voxel_spacing(image)


def figure_panels(
    fixed: np.ndarray,
    moving: np.ndarray,
    warped: np.ndarray,
    fixed_label: np.ndarray,
    moving_label: np.ndarray,
    warped_label: np.ndarray,
    ddf: np.ndarray,
    spacing: Sequence[float] | None = None,
    planes: Sequence[str] = FIGURE_PLANES,
) -> dict[str, np.ndarray]:
    """The 2D panels of one pair's registration figure: the middle slice of each plane, in the radiological view of
    ``scripts.figures`` (anterior or superior at the top, the patient's right on the image's left).

    Args:
        fixed, moving, warped: ``[X, Y, Z]`` (or ``[1, X, Y, Z]``) RAS images on one grid: the fixed image, the
            moving image and the moving image warped onto the fixed grid.
        fixed_label, moving_label, warped_label: ``[X, Y, Z]`` (or ``[1, X, Y, Z]``) integer label maps on that grid.
        ddf: ``[3, X, Y, Z]`` displacement in voxels (MONAI ``Warp`` convention: channel c along array axis c).
        spacing: voxel size along X, Y, Z in mm (the panels' physical aspect); None: isotropic.
        planes: the views, any of ``"axial"``, ``"coronal"``, ``"sagittal"``.

    Returns:
        ``<plane>_<panel>`` for every panel of `PANEL_NAMES`: ``[rows, cols]`` float32 images, int32 label slices,
        ``ddf_row``/``ddf_col`` (the in-plane displacement of each displayed pixel, in display rows/columns:
        ``scripts.figures.ddf_view``) and ``jacobian`` (the Jacobian determinant of the full 3D DDF,
        ``registration_metrics.jacobian_determinant``, then sliced); ``<plane>_index`` (the slice index along the
        axis the plane fixes), ``<plane>_aspect`` (row mm / column mm) and ``spacing`` ``[3]`` (mm).

    Raises:
        ValueError: volumes of different shapes, a DDF that is not ``[3, X, Y, Z]``, or an unknown plane.
    """

    def volume(x) -> np.ndarray:
        v = np.asarray(_plain(x) if isinstance(x, torch.Tensor) else x)
        return v[0] if v.ndim == 4 and v.shape[0] == 1 else v

    images = {"fixed": fixed, "moving": moving, "warped": warped}
    labels = {"fixed_label": fixed_label, "moving_label": moving_label, "warped_label": warped_label}
    volumes = {k: volume(v) for k, v in {**images, **labels}.items()}
    field = np.asarray(_plain(ddf) if isinstance(ddf, torch.Tensor) else ddf, dtype=np.float64)
    shapes = {k: v.shape for k, v in volumes.items()} | {"ddf": field.shape[1:]}
    if field.ndim != 4 or field.shape[0] != 3 or len(set(shapes.values())) != 1:
        raise ValueError(f"figure_panels needs [X, Y, Z] volumes and a [3, X, Y, Z] DDF on one grid, got {shapes}")
    jacobian = jacobian_determinant(torch.from_numpy(field)).numpy()
    spacing = [1.0, 1.0, 1.0] if spacing is None else [float(s) for s in spacing]
    panels: dict[str, np.ndarray] = {"spacing": np.asarray(spacing, np.float64)}
    for plane in planes:
        index = figures.middle_index(field.shape[1:], plane)
        for key in images:
            panels[f"{plane}_{key}"] = figures.slice_view(volumes[key], plane, index).astype(np.float32)
        for key in labels:
            panels[f"{plane}_{key}"] = np.rint(figures.slice_view(volumes[key], plane, index)).astype(np.int32)
        d_row, d_col = figures.ddf_view(field, plane, index)
        panels[f"{plane}_ddf_row"], panels[f"{plane}_ddf_col"] = d_row.astype(np.float32), d_col.astype(np.float32)
        panels[f"{plane}_jacobian"] = figures.slice_view(jacobian, plane, index).astype(np.float32)
        panels[f"{plane}_index"] = np.asarray(index)
        panels[f"{plane}_aspect"] = np.asarray(figures.view_aspect(spacing, plane))
    return panels


def save_panels(panels: Mapping, path: str | Path) -> Path:
    """Write `panels` (name -> array, number or string) as a compressed ``.npz`` atomically (``figures.save_panels``);
    returns the path."""
    return figures.save_panels(path, panels)


def load_panels(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``figure_panels.npz`` (no pickled objects); strings come back as 0-d unicode arrays.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a readable archive.
    """
    return figures.load_panels(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_height(panels: Mapping, plane: str) -> float:
    """Height / width of a plane's displayed panel (its physical aspect included)."""
    rows, cols = panels[f"{plane}_fixed"].shape
    return rows * float(panels[f"{plane}_aspect"]) / cols


def _show(ax, image: np.ndarray, panels: Mapping, plane: str, title: str | None = None, **kw):
    """One image panel: physical aspect, orientation letters, no ticks (a y label stays possible)."""
    shown = ax.imshow(image, aspect=float(panels[f"{plane}_aspect"]), **kw)
    figures.mark_orientation(ax, plane, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=FONT, pad=3)
    return shown


def _image_panel(ax, panels: Mapping, plane: str, key: str, contours: str, color: str, title: str | None = None):
    """An image (``fixed``, ``moving``, ``warped``; [0, 1], grey) with the outlines of a label slice."""
    _show(ax, panels[f"{plane}_{key}"], panels, plane, title, cmap="gray", vmin=0.0, vmax=1.0)
    figures.draw_contours(ax, panels[f"{plane}_{contours}"], color=color, linewidth=0.35)


def _grid_panel(ax, panels: Mapping, plane: str, step: int, title: str | None = None) -> None:
    """The deformation grid (every `step`-th display row and column moved by the DDF) on the dimmed warped image."""
    ax.set_facecolor("black")
    _show(ax, panels[f"{plane}_warped"], panels, plane, title, cmap="gray", vmin=0.0, vmax=1.0, alpha=0.55)
    figures.draw_grid(ax, panels[f"{plane}_ddf_row"], panels[f"{plane}_ddf_col"], step, GRID_COLOR, 0.5)


def _jacobian_panel(ax, panels: Mapping, plane: str, title: str | None = None):
    """det J on a diverging scale centred on 1 (blue: compression, red: expansion); folding voxels (det J <= 0)
    outlined in magenta. Returns the image (for the colour bar)."""
    from matplotlib.colors import TwoSlopeNorm

    jacobian = panels[f"{plane}_jacobian"]
    low, high = JACOBIAN_LIMITS
    shown = _show(ax, jacobian, panels, plane, title, cmap="RdBu_r", norm=TwoSlopeNorm(1.0, low, high))
    rows, cols = np.nonzero(jacobian <= 0)
    if rows.size:
        limits = ax.get_xlim(), ax.get_ylim()
        ax.scatter(cols, rows, s=9, marker="s", facecolors="none", edgecolors=FOLDING_COLOR, linewidths=0.7)
        ax.set_xlim(limits[0])
        ax.set_ylim(limits[1])
    return shown


def _jacobian_colorbar(fig, image, **kw) -> None:
    bar = fig.colorbar(image, extend="both", ticks=[0.0, 0.5, 1.0, 1.5, 2.0], **kw)
    bar.ax.tick_params(labelsize=7)
    bar.set_label("det J (magenta: det J ≤ 0, folding)", fontsize=7)


def _value(panels: Mapping, key: str) -> float:
    return float(panels[key]) if key in panels else float("nan")


def _metrics_text(panels: Mapping, folding: bool = True, sep: str = ", ") -> str:
    """``Dice 0.408, HD95 5.12 mm, folding 0.0004%`` from the case values kept with the panels (NaN ones left out;
    folding with two significant digits)."""
    parts = []
    for key, fmt in (("dice", "Dice {:.3f}"), ("hd95", "HD95 {:.2f} mm"), ("folding_percent", "folding {:.2g}%")):
        value = _value(panels, key)
        if np.isfinite(value) and (folding or key != "folding_percent"):
            parts.append(fmt.format(value))
    return sep.join(parts)


def _slice_label(panels: Mapping, plane: str) -> str:
    axis = "xyz"[figures.PLANES[plane][0]]
    return f"{plane}, {axis} = {int(panels[f'{plane}_index'])}"


def method_figure(panels: Mapping, path: str | Path, grid_step: int = 8) -> Path:
    """One method's registration figure of one pair (``registration_<method>.png``), written atomically.

    A row per plane of the panels (axial, coronal), five columns: the fixed image with the fixed label's contours
    (red), the moving image with the moving label's (blue), the warped moving image with the fixed label's contours
    (how well the warped anatomy meets the fixed labels), the deformation grid on the dimmed warped image, and the
    Jacobian determinant (diverging colour map centred on 1, folding voxels marked); every panel in the radiological
    view with its orientation letters and physical aspect. The title holds the case's Dice, HD95 and folding.

    Args:
        panels: `figure_panels` output plus ``name``, ``method``, ``scale`` and the `CASE_VALUES`
            (``figure_panels.npz``).
        path: the PNG to write.
        grid_step: display pixels between the lines of the deformation grid.

    Returns:
        the path written.

    Raises:
        ValueError: `panels` holds no view of `FIGURE_PLANES`.
        KeyError: `panels` lacks a panel of a view it holds.
    """
    planes = [p for p in FIGURE_PLANES if f"{p}_fixed" in panels]
    if not planes:
        raise ValueError(f"no panels of the views {FIGURE_PLANES} to draw")
    plt = _pyplot()
    heights = [_panel_height(panels, p) for p in planes]
    fig, axes = plt.subplots(
        len(planes),
        5,
        figsize=(5 * PANEL_INCHES + 0.8, sum(heights) * PANEL_INCHES + 0.8),
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
        squeeze=False,
    )
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.01, hspace=0.01)
    image = None
    for r, plane in enumerate(planes):
        top = r == 0
        _image_panel(axes[r, 0], panels, plane, "fixed", "fixed_label", FIXED_CONTOUR, "fixed" if top else None)
        _image_panel(axes[r, 1], panels, plane, "moving", "moving_label", MOVING_CONTOUR, "moving" if top else None)
        _image_panel(
            axes[r, 2], panels, plane, "warped", "fixed_label", FIXED_CONTOUR, "warped moving" if top else None
        )
        _grid_panel(axes[r, 3], panels, plane, grid_step, f"deformation grid ({grid_step} vx)" if top else None)
        image = _jacobian_panel(axes[r, 4], panels, plane, "Jacobian determinant" if top else None)
        axes[r, 0].set_ylabel(_slice_label(panels, plane), fontsize=FONT)
    _jacobian_colorbar(fig, image, ax=axes[:, 4], shrink=0.8, aspect=30, pad=0.01)
    name, method = str(panels.get("name", "case")), str(panels.get("method", ""))
    scale = _value(panels, "scale")
    fig.suptitle(
        f"{method}: {name}" + (f" (×{scale:g} LR input)" if np.isfinite(scale) else "") + f" — {_metrics_text(panels)}"
        "\ncontours: red = fixed labels (on fixed and warped), blue = moving labels",
        fontsize=FONT,
    )
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    return figures.save_figure(fig, path, dpi=150)


def _label_colors(labels: np.ndarray) -> np.ndarray:
    """``[rows, cols, 3]`` RGB of a label slice: id k in ``tab20`` colour ``k % 20`` (the same colour for an id in
    every panel), background (0) black."""
    import matplotlib

    table = matplotlib.colormaps["tab20"](np.arange(20))[:, :3]
    rgb = table[np.abs(labels) % 20]
    rgb[labels == 0] = 0.0
    return rgb


def comparison_figure(runs: Mapping[str, str | Path], path: str | Path, plane: str = "axial", grid_step: int = 8):
    """One figure of the same pair across methods (``comparison.png`` of ``tools/compare_methods.py``).

    Columns: the fixed image with the fixed label's contours (red) and the moving image with the moving label's
    (blue), with their label maps below them (one colour per label id) and the legend and the det J colour bar at
    the bottom; then one column per method (in the order of `runs`): its warped moving image with the fixed label's
    contours (its Dice and HD95 in the title), its deformation grid on the dimmed warped image, and its
    Jacobian-determinant map (diverging colour map centred on 1, folding voxels marked, the case's folding in the
    title). Every panel in the radiological view of ``scripts.figures`` with its orientation letters and physical
    aspect. Drawn from the ``figure_panels.npz`` that each run's `RegistrationFigureHandler` wrote.

    Args:
        runs: method name -> that method's evaluation folder (holding ``figure_panels.npz``); runs without the file
            are left out.
        path: the PNG to write.
        plane: the view (``"axial"`` or ``"coronal"``).
        grid_step: display pixels between the lines of the deformation grid.

    Returns:
        the path written, or None when no run has panels.

    Raises:
        ValueError: the runs' panels show different cases, or `plane` is not in them.
    """
    loaded = {m: load_panels(Path(d) / PANELS_FILE) for m, d in runs.items() if (Path(d) / PANELS_FILE).is_file()}
    if not loaded:
        return None
    names = {m: str(p.get("name", "")) for m, p in loaded.items()}
    if len(set(names.values())) != 1:
        raise ValueError(f"the runs' figure panels show different cases: {names}")
    first = next(iter(loaded.values()))
    if f"{plane}_fixed" not in first:
        raise ValueError(f"no {plane} panels in {PANELS_FILE} (planes: {FIGURE_PLANES})")
    plt = _pyplot()
    n = len(loaded)
    height = _panel_height(first, plane)
    fig = plt.figure(figsize=((2 + n) * PANEL_INCHES, 3 * height * PANEL_INCHES + 0.7), layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.0, hspace=0.0)
    grid = fig.add_gridspec(3, 2 + n)
    _image_panel(fig.add_subplot(grid[0, 0]), first, plane, "fixed", "fixed_label", FIXED_CONTOUR, "fixed")
    _image_panel(fig.add_subplot(grid[0, 1]), first, plane, "moving", "moving_label", MOVING_CONTOUR, "moving")
    for c, key in enumerate(("fixed_label", "moving_label")):
        ax = fig.add_subplot(grid[1, c])
        _show(ax, _label_colors(first[f"{plane}_{key}"]), first, plane, key.replace("_", " "), interpolation="nearest")
    image = None
    for c, (method, panels) in enumerate(loaded.items(), start=2):
        warped = fig.add_subplot(grid[0, c])
        values = _metrics_text(panels, folding=False, sep=" · ")
        _image_panel(
            warped, panels, plane, "warped", "fixed_label", FIXED_CONTOUR, method + (f"\n{values}" * bool(values))
        )
        grid_ax = fig.add_subplot(grid[1, c])
        _grid_panel(grid_ax, panels, plane, grid_step)
        folding = _value(panels, "folding_percent")
        jac_ax = fig.add_subplot(grid[2, c])
        image = _jacobian_panel(jac_ax, panels, plane, f"folding {folding:.2g}%" if np.isfinite(folding) else None)
        if c == 2:
            warped.set_ylabel("warped moving", fontsize=FONT)
            grid_ax.set_ylabel(f"deformation grid ({grid_step} vx)", fontsize=FONT)
            jac_ax.set_ylabel("Jacobian determinant", fontsize=FONT)
    legend = fig.add_subplot(grid[2, 0:2])
    legend.axis("off")
    legend.text(
        0.02,
        0.98,
        "contours: red = fixed labels (on fixed and on\neach warped image), blue = moving labels\n"
        f"grid: every {grid_step}th voxel row and column of the fixed\n"
        "grid, drawn where the DDF samples the moving image\n"
        "det J: blue = compression, red = expansion,\nmagenta squares = folding (det J ≤ 0)",
        fontsize=FONT,
        va="top",
        ha="left",
        linespacing=1.3,
        transform=legend.transAxes,
    )
    _jacobian_colorbar(fig, image, cax=legend.inset_axes([0.04, 0.22, 0.92, 0.07]), orientation="horizontal")
    scale = _value(first, "scale")
    fig.suptitle(
        f"{names[next(iter(loaded))]}: {_slice_label(first, plane)}"
        + (f" (×{scale:g} LR input)" if np.isfinite(scale) else ""),
        fontsize=FONT + 1,
    )
    return _save(fig, path)


class RegistrationFigureHandler:
    """Saves the first pair's figure ``registration_<method>.png`` and its panels ``figure_panels.npz`` in
    `output_dir`.

    At the first iteration the handler takes the middle axial and coronal slices of the first pair of the batch
    (`figure_panels`: the HR fixed and moving images, the moving image warped by the method's DDF, the fixed, moving
    and warped label maps, the in-plane DDF and the Jacobian determinant of the full DDF); the inputs are RAS-oriented
    (evaluation's ``Orientationd("RAS")``, checked). At the end of the run it adds the case's Dice, HD95 and folding
    (the metric handlers' per-case values, ``engine.state.metric_details``), writes the panels (atomically, for
    ``comparison_figure``) and draws `method_figure`. The layout follows the qualitative registration figures of
    registration papers (fixed, moving, warped with label contours, deformation grid, Jacobian map).

    Args:
        output_dir: the folder of the figure and the panels.
        method: the evaluated method (the file name and the title).
        scale: the LR factor (the title).
        sr_input: whether the network's input images are REM's outputs (kept in the panels as ``sr_input``).
        grid_step: display pixels between the lines of the deformation grid.
    """

    def __init__(
        self, output_dir: str, method: str, scale: float = 4, sr_input: bool = True, grid_step: int = 8
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = str(method)
        self.scale = float(scale)
        self.sr_input = bool(sr_input)
        self.grid_step = int(grid_step)
        self.panels: dict | None = None

    @property
    def path(self) -> Path:
        """Where the figure is written: ``output_dir / registration_<method>.png``."""
        return self.output_dir / f"registration_{self.method}.png"

    @property
    def panels_path(self) -> Path:
        """Where the panels are written: ``output_dir / figure_panels.npz``."""
        return self.output_dir / PANELS_FILE

    def attach(self, engine: Engine) -> None:
        """Capture the first pair after the first iteration; write at the end of the run."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def _reset(self, engine: Engine) -> None:
        self.panels = None

    def capture(self, engine: Engine) -> None:
        """Keep the 2D panels of the first pair of the batch (``engine.state.output``/``batch``, post-processed).

        Raises:
            ValueError: the volumes are not RAS-oriented.
        """
        output, batch = engine.state.output, engine.state.batch
        out = output[0] if isinstance(output, list) else {k: v[0] for k, v in output.items() if k != "seconds"}
        item = batch[0] if isinstance(batch, list) else decollate_batch(batch)[0]

        def get(key):
            return out[key] if key in out else item[key]

        def array(key) -> np.ndarray:
            return _plain(get(key)).float().cpu().numpy()

        self.panels = figure_panels(
            array("fixed_image"),
            array("moving_image"),
            array("warped_moving_image"),
            array("fixed_label"),
            array("moving_label"),
            array("warped_moving_label"),
            array("pred"),
            spacing=_ras_spacing(get("fixed_image")),
        )
        self.panels.update(
            name=np.asarray(case_name(item, "moving_image")),
            method=np.asarray(self.method),
            scale=np.asarray(self.scale),
            sr_input=np.asarray(self.sr_input),
        )

    def _case_values(self, engine: Engine) -> dict[str, float]:
        """The first case's `CASE_VALUES` (mean over labels; NaN when a metric is missing)."""
        details = getattr(engine.state, "metric_details", {}) or {}
        values = {}
        for name in CASE_VALUES:
            values[name] = float("nan")
            if name in details and len(details[name]):
                first = np.asarray(_plain(details[name][0]).double()).ravel()
                first = first[~np.isnan(first)]
                if first.size:
                    values[name] = float(first.mean())
        return values

    def write(self, engine: Engine) -> None:
        """Write the panels and the figure of the captured pair (nothing when no pair was captured)."""
        if self.panels is None:
            return
        self.panels.update({k: np.asarray(v) for k, v in self._case_values(engine).items()})
        save_panels(self.panels, self.panels_path)
        method_figure(self.panels, self.path, self.grid_step)
