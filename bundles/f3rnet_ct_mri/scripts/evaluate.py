"""What MONAI lacks for the f3rnet_ct_mri evaluation (``configs/evaluate.json``, an override of ``train.json``).

One run evaluates one method (one row of the paper's Tables 2/3): ``identity`` (no registration, a zero DDF from
`ZeroDDF`) or an F3D variant of F3RNet with its weights. MONAI's ``SupervisedEvaluator`` iterates the test pairs
with `F3RNetEvaluateStep` (the timed forward pass); the postprocessing warps the moving label with the DDF and
one-hot encodes it; MONAI metric handlers compute Dice, and, with the metrics of ``registration_metrics.py``,
surface distances in mm, folding, SDlogJ and the forward time; ``MetricsSaver`` writes the files;
`RegistrationFigure` draws the first pair in the layout of the paper's Fig. 4.

Paper: Z. Xu, J. Luo, J. Yan, X. Li, J. Jayender, "F3RNet: Full-Resolution Residual Registration Network for
Multimodal Image Registration".
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.handlers import from_engine
from monai.metrics import compute_dice

from .common import BundleInputError, atomic_write_bytes, case_name, config_flag, unwrap
from .metrics import label_one_hot
from .transforms import MODALITIES

__all__ = [
    "METHOD_TITLES",
    "F3RNetEvaluateStep",
    "RegistrationFigure",
    "ZeroDDF",
    "check_method",
    "organ_channels",
]

# the row names of the paper's tables
METHOD_TITLES = {
    "identity": "Moving (no registration)",
    "none": "F3RNet-w/o F3D",
    "all": "F3RNet-w/ F3D",
    "encoder": "F3RNet-Enc",
    "decoder": "F3RNet-Dec",
    "fr": "F3RNet-FR",
    "ms": "F3RNet-MS",
    "all_more_mrb": "F3RNet-MRB",
}
# contour colours of the paper's figures: liver green, kidneys red, spleen blue
CONTOUR_COLOURS = {"liver": "lime", "spleen": "deepskyblue", "right kidney": "red", "left kidney": "red"}
# how the figure prints a metric's value for the first pair
METRIC_FORMATS = {
    "dice": "Dice {:.3f}",
    "asd": "ASD {:.2f} mm",
    "hd95": "HD95 {:.2f} mm",
    "folding_percent": "folding {:.3f}%",
    "sdlogj": "SDlogJ {:.3f}",
    "seconds": "{:.2f} s",
}


class ZeroDDF(torch.nn.Module):
    """The ``identity`` method, the paper's "Moving" row (no registration; pairs assumed affinely pre-aligned)."""

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """A zero DDF.

        Args:
            pair: ``[B, 2, X, Y, Z]`` moving and fixed image (values unused).

        Returns:
            ``[B, 3, X, Y, Z]`` zeros (displacements in voxels), dtype and device of `pair`.
        """
        return pair.new_zeros((pair.shape[0], 3, *pair.shape[2:]))


def check_method(method: str, methods: Mapping[str, Any] | Sequence[str]) -> str:
    """Check that `method` is one of the configured methods (the keys of ``method_weights``).

    Args:
        method: the ``--method`` value.
        methods: the configured methods (a dict's keys are used).

    Returns:
        `method`.

    Raises:
        BundleInputError: `method` is not configured; the message lists the valid ones.
    """
    names = [str(m) for m in methods]
    if str(method) not in names:
        raise BundleInputError(
            f"method must be one of {', '.join(names)}, got {method!r} (config key method_weights "
            f"lists the methods and their weights)"
        )
    return str(method)


def organ_channels(keys: Sequence[str], channels: Sequence[int]) -> Callable:
    """An ``output_transform`` for a metric handler on a group of organs (a column of the paper's tables).

    Args:
        keys: the one-hot output keys, e.g. ``["warped_moving_label", "label"]``: ``[C, X, Y, Z]`` per pair
            (or ``[B, C, X, Y, Z]`` when not decollated), channel ``i`` = label id ``i``.
        channels: the label ids of the group, e.g. ``[3, 4]`` for both kidneys.

    Returns:
        A callable mapping ``engine.state.output`` to the values of `keys` restricted to `channels` (metadata,
        hence the voxel spacing, kept), for a metric with ``include_background=True``.
    """
    get = from_engine(list(keys))
    index = [int(c) for c in channels]

    def transform(output: Any) -> tuple:
        values = get(output)
        return tuple([t[index] for t in v] if isinstance(v, list) else v[:, index] for v in values)

    return transform


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class F3RNetEvaluateStep:
    """``iteration_update`` of the evaluation's ``SupervisedEvaluator``: one timed forward pass per batch.

    The network (F3RNet, or `ZeroDDF` for ``identity``) maps ``cat(moving_image, fixed_image)``
    ``[B, 2, X, Y, Z]`` (normalised to [0, 1]) to a DDF ``[B, 3, X, Y, Z]`` in voxels. The first call runs one
    untimed warm-up forward (the first call of a network allocates its buffers; as the paper times inference).

    Output (``engine.state.output``, before MONAI's decollation and postprocessing): ``pred`` the DDF on the CPU as
    a ``MetaTensor`` with the fixed image's metadata (affine), and ``seconds`` ``[B, 1]``: the forward time of the
    batch (after CUDA synchronisation) divided by its size.

    Args:
        warmup: run the warm-up forward (a bool or a command-line string, see ``common.config_flag``).

    Raises:
        BundleInputError: `warmup` is not a boolean.
    """

    def __init__(self, warmup: bool | str = True) -> None:
        self.warmup = config_flag(warmup, "warmup")
        self._warmed_up = False

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> Any:
        device = engine.state.device
        fixed = batch["fixed_image"]
        pair = torch.cat(
            [
                torch.as_tensor(batch[k]).as_subclass(torch.Tensor).float().to(device)
                for k in ("moving_image", "fixed_image")
            ],
            dim=1,
        )
        network = unwrap(engine.network)
        network.eval()
        amp = bool(getattr(engine, "amp", False)) and device.type == "cuda"
        with torch.autocast(device_type=device.type, enabled=amp):
            if self.warmup and not self._warmed_up:
                network(pair)
                self._warmed_up = True
            _sync(device)
            start = time.perf_counter()
            ddf = network(pair)
            _sync(device)
            seconds = (time.perf_counter() - start) / pair.shape[0]
        pred = MetaTensor(ddf.float().cpu(), meta=getattr(fixed, "meta", {}), applied_operations=[])
        pred.is_batch = True
        engine.state.output = {"pred": pred, "seconds": torch.full((pair.shape[0], 1), seconds, dtype=torch.float64)}
        # MONAI's decollation and postprocessing run on these events (its default iteration fires them)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _first(data: Any) -> dict:
    """The first pair of a decollated list, or of a collated dict (index 0 of every tensor)."""
    if isinstance(data, list):
        return data[0]
    return {k: (v[0] if isinstance(v, (torch.Tensor, list, tuple)) and len(v) else v) for k, v in data.items()}


def _numpy(x: Any) -> np.ndarray:
    return torch.as_tensor(x).as_subclass(torch.Tensor).detach().float().cpu().numpy()


class RegistrationFigure:
    """Ignite handler: a PNG of the first pair in the layout of the paper's Fig. 4, for the run's one method.

    Panels on the axial slice (last axis) with the most liver (label 1; else the most foreground), in
    radiological view: the fixed image with the contours of the fixed labels (liver green, spleen blue, kidneys
    red); the moving image and the warped moving image under the same contours (titles: mean organ Dice before
    registration, and the method's Dice / ASD / HD95 for this pair); the in-plane deformation grid (folding and
    SDlogJ of this pair). Written atomically to ``output_dir/filename`` at the end of the run (rank 0).

    Keys (after MONAI's postprocessing): batch ``moving_image``, ``fixed_image`` ``[1, X, Y, Z]`` (normalised),
    ``fixed_label``, ``moving_label`` ``[1, X, Y, Z]`` ids; output ``warped_moving_image`` ``[1, X, Y, Z]`` and
    ``pred`` (DDF ``[3, X, Y, Z]``, voxels). Metric values come from ``engine.state.metric_details``.

    Args:
        output_dir: folder of the PNG.
        filename: e.g. ``registration_none_ct2mri.png``.
        method: the method name (its title from `METHOD_TITLES`).
        direction: ``ct2mri`` or ``mri2ct`` (names the modalities).
        label_names: ``{label id: organ name}``.
        grid_step: voxels between the lines of the deformation grid.
    """

    def __init__(
        self,
        output_dir: str,
        filename: str,
        method: str,
        direction: str,
        label_names: Mapping[Any, str],
        grid_step: int = 6,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.method = str(method)
        self.direction = str(direction)
        self.labels = {int(k): str(v) for k, v in label_names.items()}
        self.grid_step = max(1, int(grid_step))
        self.data: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Keep the first pair's slices after the first iteration; draw at the end of the epoch."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    @staticmethod
    def _slice(label: np.ndarray) -> int:
        organ = (label == 1) if (label == 1).any() else (label > 0)
        counts = organ.sum(axis=(0, 1))
        return int(np.argmax(counts)) if counts.max() > 0 else label.shape[-1] // 2

    def capture(self, engine: Engine) -> None:
        """Store the first pair's axial slices, its name and its Dice before registration."""
        batch, output = _first(engine.state.batch), _first(engine.state.output)
        fixed_label = _numpy(batch["fixed_label"])[0]
        z = self._slice(fixed_label)
        num_classes = max(self.labels) + 1
        before = compute_dice(
            label_one_hot(torch.as_tensor(batch["moving_label"])[None], num_classes),
            label_one_hot(torch.as_tensor(batch["fixed_label"])[None], num_classes),
            include_background=False,
            ignore_empty=True,
        )
        self.data = {
            "name": case_name(batch, "moving_image"),
            "z": z,
            "label": fixed_label[:, :, z],
            "fixed": _numpy(batch["fixed_image"])[0, :, :, z],
            "moving": _numpy(batch["moving_image"])[0, :, :, z],
            "warped": _numpy(output["warped_moving_image"])[0, :, :, z],
            "ddf": _numpy(output["pred"])[:2, :, :, z],
            "dice_before": float(torch.nanmean(before)),
        }

    def _values(self, engine: Engine, names: Sequence[str]) -> str:
        """`METRIC_FORMATS` of the first pair's values (mean over organs) of the metrics that ran."""
        details = getattr(engine.state, "metric_details", {}) or {}
        parts = []
        for name in names:
            if name in details:
                value = torch.as_tensor(details[name]).double().reshape(len(details[name]), -1)[0]
                parts.append(METRIC_FORMATS[name].format(float(torch.nanmean(value))))
        return " | ".join(parts)

    def write(self, engine: Engine) -> None:
        """Draw and save the PNG (nothing when no pair was seen, or on ranks other than 0)."""
        import ignite.distributed as idist

        if self.data is None or idist.get_rank() != 0:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        d = self.data
        # radiological view of an axial slice of a RAS volume: anterior up, the patient's right on the left
        view = lambda a: np.ascontiguousarray(a[::-1, ::-1].T)  # noqa: E731
        roles = MODALITIES.get(self.direction, {"fixed": "fixed", "moving": "moving"})
        title = METHOD_TITLES.get(self.method, self.method)
        panels = [
            (f"fixed ({roles['fixed'].upper()}) + organ contours", view(d["fixed"])),
            (f"moving ({roles['moving'].upper()}), no registration\nDice {d['dice_before']:.3f}", view(d["moving"])),
            (f"warped, {title}\n{self._values(engine, ('dice', 'asd', 'hd95'))}", view(d["warped"])),
        ]
        fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.9 * (len(panels) + 1), 3.4), squeeze=False)
        labels = view(d["label"])
        for ax, (text, img) in zip(axes[0], panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            for label_id, organ in self.labels.items():
                mask = (labels == label_id).astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=CONTOUR_COLOURS.get(organ, "yellow"), linewidths=0.7)
            ax.set_title(text, fontsize=7)
            ax.axis("off")
        ax = axes[0][-1]
        ax.imshow(0.5 * view(d["fixed"]), cmap="gray", vmin=0, vmax=1)
        nx, ny = d["ddf"].shape[1:]
        i, j = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
        cols, rows = nx - 1 - (i + d["ddf"][0]), ny - 1 - (j + d["ddf"][1])  # where view() draws voxel (i, j)
        for k in range(0, nx, self.grid_step):
            ax.plot(cols[k, :], rows[k, :], color="orange", linewidth=0.5)
        for k in range(0, ny, self.grid_step):
            ax.plot(cols[:, k], rows[:, k], color="orange", linewidth=0.5)
        ax.set_xlim(-0.5, nx - 0.5)
        ax.set_ylim(ny - 0.5, -0.5)
        ax.set_title(f"deformation grid (in-plane)\n{self._values(engine, ('folding_percent', 'sdlogj'))}", fontsize=7)
        ax.axis("off")
        fig.suptitle(
            f"{d['name']}: {self.direction}, {title}, axial slice {d['z']}; contours: fixed labels "
            f"(liver green, spleen blue, kidneys red)",
            fontsize=8,
        )
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(self.path, buffer.getvalue())
