"""What MONAI lacks for the f3rnet_ct_mri evaluation (``configs/evaluate.json``, an override of ``train.json``).

One run evaluates one method (one row of the paper's Tables 2/3): ``identity`` (no registration, a zero DDF from
`ZeroDDF`) or an F3D variant of F3RNet with its weights. MONAI's ``SupervisedEvaluator`` iterates the test pairs
with `F3RNetEvaluateStep` (the timed forward pass); the postprocessing warps the moving label with the DDF and
one-hot encodes it; MONAI metric handlers compute Dice, and, with the metrics of ``registration_metrics.py``,
surface distances in mm, folding, SDlogJ and the forward time, each organ's own Dice / ASD / HD95 through
`organ_channels`; ``MetricsSaver`` writes the files; `RegistrationFigure` keeps the first pair's panels
(``figure_panels.npz``) and draws them in the layout of the paper's Fig. 4; `comparison_figure` draws one pair
across the methods' runs (``tools/compare_methods.py`` calls it).

Paper: Z. Xu, J. Luo, J. Yan, X. Li, J. Jayender, "F3RNet: Full-Resolution Residual Registration Network for
Multimodal Image Registration".
"""

from __future__ import annotations

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

from . import figure_panels
from .common import BundleInputError, case_name, config_flag, unwrap
from .transforms import MODALITIES

__all__ = [
    "METHOD_TITLES",
    "F3RNetEvaluateStep",
    "RegistrationFigure",
    "ZeroDDF",
    "check_method",
    "comparison_figure",
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
    """An ``output_transform`` for a metric handler on one organ (or a group of organs).

    ``evaluate.json`` uses it once per organ (``dice_kidney_right`` reads label id 3 only), so that each organ is
    reported on its own (the paper's tables have one kidney column).

    Args:
        keys: the one-hot output keys, e.g. ``["warped_moving_label", "label"]``: ``[C, X, Y, Z]`` per pair
            (or ``[B, C, X, Y, Z]`` when not decollated), channel ``i`` = label id ``i``.
        channels: the label ids, e.g. ``[3]`` for the right kidney (``[3, 4]``: both kidneys as one group).

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

    def __init__(self, warmup: bool | str = True, io=None) -> None:
        self.warmup = config_flag(warmup, "warmup")
        self.io = io
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
            # through the evaluator's inferer, as inference.json (inference mode, bf16 on the CPU: `precision`)
            if self.warmup and not self._warmed_up:
                engine.inferer(pair, network)
                self._warmed_up = True
            _sync(device)
            start = time.perf_counter()
            ddf = engine.inferer(pair, network)
            if self.io is not None and self.io.enabled:
                # instance optimisation of the network's field (MIND-SSC), the rows "+ IO" and "IO from identity"
                ddf = self.io(ddf.float(), pair[:, :1], pair[:, 1:])
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


def _ids(label: Any) -> torch.Tensor:
    """``[X, Y, Z]`` label ids of a ``[1, X, Y, Z]`` label map or a ``[C, X, Y, Z]`` one-hot (argmax)."""
    t = torch.as_tensor(label).as_subclass(torch.Tensor).detach().cpu()
    return t[0] if t.shape[0] == 1 else t.argmax(0)


class RegistrationFigure:
    """Ignite handler: the panels and the figure of the run's first pair, for the run's one method.

    After the first iteration it captures the pair (`figure_panels.capture_panels`: an axial and a coronal slice
    through the organs of the fixed image, in radiological view; images, fixed / moving / warped labels, in-plane
    DDF, Jacobian determinant, per-organ Dice before and after registration). At the end of the run (rank 0) it
    writes them atomically as ``output_dir/figure_panels.npz`` (what `comparison_figure` reads) and draws
    ``output_dir/filename`` (`figure_panels.method_figure`): fixed, moving and warped images with one contour
    colour per organ, the deformation grid and the Jacobian-determinant map, orientation letters on every
    panel, the per-organ Dice in the titles (right and left kidney apart).

    Keys (after MONAI's postprocessing): batch ``moving_image``, ``fixed_image`` ``[1, X, Y, Z]`` (normalised,
    RAS-oriented: the evaluation's ``Orientationd("RAS")``), ``fixed_label``, ``moving_label`` ``[1, X, Y, Z]``
    ids; output ``warped_moving_image`` ``[1, X, Y, Z]``, ``warped_moving_label`` (``[C, X, Y, Z]`` one-hot or
    ``[1, X, Y, Z]`` ids) and ``pred`` (DDF ``[3, X, Y, Z]``, voxels).

    Args:
        output_dir: folder of the PNG and the panels file.
        filename: the PNG's name, e.g. ``registration_none_ct2mri.png``.
        method: the method name (its title from `METHOD_TITLES`).
        direction: ``ct2mri`` or ``mri2ct`` (names the modalities).
        label_names: ``{label id: organ name}``.
        panels_filename: the panels file's name (``figure_panels.npz``).

    Raises:
        ValueError: (when the first pair is captured) its volumes are not RAS-oriented.
    """

    def __init__(
        self,
        output_dir: str,
        filename: str,
        method: str,
        direction: str,
        label_names: Mapping[Any, str],
        panels_filename: str = figure_panels.PANELS_FILE,
    ) -> None:
        self.path = Path(output_dir) / filename
        self.panels_path = Path(output_dir) / panels_filename
        self.method = str(method)
        self.direction = str(direction)
        self.labels = {int(k): str(v) for k, v in label_names.items()}
        self.panels: dict | None = None

    def attach(self, engine: Engine) -> None:
        """Capture the first pair after the first iteration; write at the end of the epoch."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.capture)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def capture(self, engine: Engine) -> None:
        """Keep the first pair's panels (`figure_panels.capture_panels`), its name and the method's names."""
        batch, output = _first(engine.state.batch), _first(engine.state.output)
        fixed = batch["fixed_image"]
        roles = MODALITIES.get(self.direction, {"fixed": "fixed", "moving": "moving"})
        self.panels = figure_panels.capture_panels(
            fixed=fixed,
            moving=batch["moving_image"],
            warped=output["warped_moving_image"],
            fixed_label=_ids(batch["fixed_label"]),
            moving_label=_ids(batch["moving_label"]),
            warped_label=_ids(output["warped_moving_label"]),
            ddf=output["pred"],
            affine=fixed.affine,
            organs=self.labels,
        )
        self.panels.update(
            case=np.asarray(case_name(batch, "moving_image")),
            method=np.asarray(self.method),
            method_title=np.asarray(METHOD_TITLES.get(self.method, self.method)),
            direction=np.asarray(self.direction),
            fixed_modality=np.asarray(roles["fixed"].upper()),
            moving_modality=np.asarray(roles["moving"].upper()),
        )

    def write(self, engine: Engine) -> None:
        """Write the panels file and the PNG (nothing when no pair was seen, or on ranks other than 0)."""
        import ignite.distributed as idist

        if self.panels is None or idist.get_rank() != 0:
            return
        figure_panels.save_panels(self.panels_path, self.panels)
        figure_panels.method_figure(self.panels, self.path)


def comparison_figure(runs: Mapping[str, str | Path], path: str | Path) -> Path | None:
    """The same test pair across methods, one column per method (called by ``tools/compare_methods.py``).

    Args:
        runs: method name -> that method's evaluation run folder, holding the ``figure_panels.npz`` that
            `RegistrationFigure` wrote, in column order (e.g. identity, none, all).
        path: the PNG to write, e.g. ``<output_dir>/all/comparison.png``.

    Returns:
        `path`, or None when `runs` is empty.

    Raises:
        FileNotFoundError: a run folder has no ``figure_panels.npz``.
        ValueError: the runs do not show the same pair and slices.
    """
    return figure_panels.comparison_figure(runs, path)
