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
- `RegistrationFigureHandler`: the figure of the first pair.
"""

from __future__ import annotations

import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor, decollate_batch
from monai.engines.utils import IterationEvents
from monai.metrics import PSNRMetric
from monai.networks.blocks import Warp
from torch import nn

from .common import BundleInputError, atomic_write_bytes, case_name, unwrap
from .networks import RegistrationCascade, build_registration_network

__all__ = [
    "ChannelMeanPSNRMetric",
    "RegistrationEvaluateStep",
    "RegistrationFigureHandler",
    "ZeroDDF",
    "check_method",
    "method_network",
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
) -> RegistrationCascade:
    """The network of one evaluated method (the ``network_def`` of evaluate.json).

    Args:
        backbone: ``"zero"`` for the identity baseline (`ZeroDDF`, no REM), else a backbone of
            ``scripts.networks.build_registration_network`` (``"fdrn"``, ``"voxelmorph"``).
        rem: the frozen REM, or None (the backbone on trilinear-upsampled input).
        fdrn_channels: FDRN widths per level; ignored for the other backbones.
        fdrn_num_res: FDRN residual units per stage; ignored for the other backbones.

    Returns:
        a ``RegistrationCascade``: ``forward`` maps the LR pair ``[B, 2, D, H, W]`` to a DDF ``[B, 3, D, H, W]``
        (voxels), ``forward(x, return_dict=True)`` also gives the network's input images (``sr_moving``,
        ``sr_fixed``: REM's outputs, or the trilinear-upsampled LR images without REM).

    Raises:
        ValueError: unknown backbone (see ``build_registration_network``).
    """
    if str(backbone).lower() == "zero":
        return RegistrationCascade(ZeroDDF(), None)
    return build_registration_network(backbone, rem, fdrn_channels=fdrn_channels, fdrn_num_res=fdrn_num_res)


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

    Raises:
        BundleInputError: (on a call) a label map holds an id >= `num_classes`; the message names the file.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes

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
            out = network(pair, return_dict=True)
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


def _label_edges(labels: np.ndarray) -> np.ndarray:
    """Boolean map of the voxels whose right or lower neighbour has another label id (the label contours)."""
    edges = np.zeros(labels.shape, bool)
    edges[:-1] |= labels[:-1] != labels[1:]
    edges[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    return edges


class RegistrationFigureHandler:
    """Saves ``registration_<method>.png`` in `output_dir`: the first pair's axial middle slice.

    Panels: fixed (HR), moving (HR), the network's fixed input (REM output or trilinear), the warped moving
    input with the fixed label's contours (red) and the case's Dice/HD95 in the title, and the deformation grid
    (in-plane DDF components, every 6th line). The images are taken at the first iteration, the metric values
    at the end of the run from ``engine.state.metric_details`` (the metric handlers' per-case values), and the
    PNG is written atomically.

    Args:
        output_dir: the folder of the figure.
        method: the evaluated method (the file name and the title).
        scale: the LR factor (the title).
        sr_input: whether the network's input images are REM's outputs (true) or trilinear (false).
        grid_step: voxels between the lines of the deformation grid.
    """

    def __init__(
        self, output_dir: str, method: str, scale: float = 4, sr_input: bool = True, grid_step: int = 6
    ) -> None:
        self.output_dir = Path(output_dir)
        self.method = str(method)
        self.scale = float(scale)
        self.sr_input = bool(sr_input)
        self.grid_step = int(grid_step)
        self.warp = Warp(mode="bilinear", padding_mode="border")
        self.panels: dict | None = None

    @property
    def path(self) -> Path:
        """Where the figure is written: ``output_dir / registration_<method>.png``."""
        return self.output_dir / f"registration_{self.method}.png"

    def attach(self, engine: Engine) -> None:
        """Capture the first pair after the first iteration; draw at the end of the run."""
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def _reset(self, engine: Engine) -> None:
        self.panels = None

    def capture(self, engine: Engine) -> None:
        """Keep the 2D slices of the first pair of the batch (``engine.state.output``/``batch``)."""
        output, batch = engine.state.output, engine.state.batch
        out = output[0] if isinstance(output, list) else {k: v[0] for k, v in output.items() if k != "seconds"}
        item = batch[0] if isinstance(batch, list) else decollate_batch(batch)[0]

        def get(key):
            return _plain(out[key] if key in out else item[key]).float().cpu()

        ddf = get("pred")
        z = ddf.shape[-1] // 2
        warped_input = self.warp(get("sr_moving")[None], ddf[None])[0]
        take = lambda v: v[0, :, :, z].numpy()  # noqa: E731
        self.panels = {
            "name": case_name(item, "moving_image"),
            "z": z,
            "fixed": take(get("fixed_image")),
            "moving": take(get("moving_image")),
            "input_fixed": take(get("sr_fixed")),
            "warped": take(warped_input),
            "fixed_label": np.rint(take(get("fixed_label"))).astype(int),
            "ddf": ddf[:2, :, :, z].numpy(),
        }

    def _case_values(self, engine: Engine) -> dict[str, float]:
        details = getattr(engine.state, "metric_details", {}) or {}
        values = {}
        for name in ("dice", "hd95"):
            if name in details and len(details[name]):
                first = np.asarray(_plain(details[name][0]).double()).ravel()
                first = first[~np.isnan(first)]
                if first.size:
                    values[name] = float(first.mean())
        return values

    def write(self, engine: Engine) -> None:
        """Draw the captured pair and write the PNG (nothing when no pair was captured)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        p = self.panels
        if p is None:
            return
        values = self._case_values(engine)
        show = lambda v: np.rot90(v)  # noqa: E731
        input_name = "REM output" if self.sr_input else "trilinear"
        warped_title = (
            "warped moving input"
            + (f"\nDice {values['dice']:.3f}" if "dice" in values else "")
            + (f", HD95 {values['hd95']:.2f} mm" if "hd95" in values else "")
        )
        panels = [
            ("fixed (HR)", p["fixed"]),
            ("moving (HR)", p["moving"]),
            (f"fixed input ({input_name})", p["input_fixed"]),
            (warped_title, p["warped"]),
        ]
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.7 * (len(panels) + 1), 3.4))
        for ax, (title, img) in zip(axes, panels):
            ax.imshow(show(img), cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        edges = show(_label_edges(p["fixed_label"]))
        overlay = np.zeros((*edges.shape, 4))
        overlay[edges] = (1.0, 0.15, 0.15, 0.8)
        axes[len(panels) - 1].imshow(overlay)
        ax = axes[-1]
        u_i, u_j = p["ddf"]
        step = self.grid_step
        # (x, y) = (i + u_i, j + u_j) on upward axes matches the rot90 view of the image panels
        for i in range(0, u_i.shape[0], step):  # lines of constant first index
            ax.plot(i + u_i[i, :], np.arange(u_i.shape[1]) + u_j[i, :], "g-", linewidth=0.4)
        for j in range(0, u_i.shape[1], step):  # lines of constant second index
            ax.plot(np.arange(u_i.shape[0]) + u_i[:, j], j + u_j[:, j], "g-", linewidth=0.4)
        ax.set_title("deformation grid", fontsize=7)
        ax.set_aspect("equal")
        ax.axis("off")
        fig.suptitle(
            f"{self.method}: {p['name']} (x{self.scale:g}, axial slice {p['z']}; red: fixed labels)", fontsize=9
        )
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.path, buffer.getvalue())
