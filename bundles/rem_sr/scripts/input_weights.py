"""REM weights chosen by the kind of low-resolution input.

One REM trained on every degradation at once (``models/model.pt``: isotropic x2 and x4, thick slices x2-x6) has to
apply one compromise to inputs whose best filters differ: on the held-out test brain a single linear filter fitted to
all of them scores 27.1 dB at x2, one fitted to x2 alone 28.9 dB (``tools/linear_sr_bound.py``, the model card). The
same network fine-tuned on one kind of input (``models/model_x2.pt``) does much better on that kind, so inference
picks the weights from the input's geometry, which it knows: the zoom factors of the upsampling to the target grid.
A kind without a file of its own uses ``models/model.pt``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .common import BundleInputError, checked_state, unwrap

KINDS = ("x2", "x4", "thick", "default")


def degradation_kind(zoom: Sequence[float]) -> str:
    """
    The kind of input an upsampling by ``zoom`` (per axis, >= 1) refines.

    Args:
        zoom: the zoom factor of each spatial axis (1 = not resampled).

    Returns:
        ``"thick"`` when exactly one axis is refined (thick slices); for every axis refined by the same factor,
        ``"x2"`` up to 2.5 and ``"x4"`` above (isotropic); ``"default"`` otherwise (two axes refined, unequal factors,
        nothing refined).
    """
    z = np.asarray([float(v) for v in zoom])
    refined = z > 1.0 + 1e-3
    if refined.sum() == 1:
        return "thick"
    if refined.all() and np.allclose(z, z[0], rtol=1e-3):
        return "x2" if z[0] <= 2.5 else "x4"
    return "default"


def weights_for_scale(scale: float | Sequence[float], weights: Mapping[str, str]) -> str:
    """
    The weights file of an evaluation at ``scale`` (one factor, or one per axis): ``weights[degradation_kind]``,
    else ``weights["default"]``.

    Args:
        scale: the degradation factor(s) of the evaluation.
        weights: ``{"default": path, "x2": path, "x4": path, "thick": path}`` (any kind but the default may be
            missing).

    Returns:
        the path.
    """
    zoom = [float(scale)] * 3 if np.isscalar(scale) else [float(s) for s in scale]
    return str(weights.get(degradation_kind(zoom), weights["default"]))


class PerInputWeightsHandler:
    """
    Ignite handler: before each case, load the REM weights for the case's kind of input (:func:`degradation_kind`
    of its upsampling zoom, written by ``UpsampleToTargetd(zoom_key=...)``) into the network, when they differ from
    the loaded ones, and print ``<case>: REM weights <file> (<kind> input)``. A kind whose file is absent uses the
    ``"default"`` weights.

    Args:
        network: the REM network the evaluator runs.
        weights: ``{"default": path, "x2": path, "x4": path, "thick": path}``.
        zoom_key: the batch key of the zoom factors ([B, 3]).
        name_key: the batch key of the case name, for the printed line.
        device: where the weights are loaded.

    Raises:
        BundleInputError: (when a case needs them) weights that are missing (``default``) or do not fit the network.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        weights: Mapping[str, str],
        zoom_key: str = "upsampling_zoom",
        name_key: str = "name",
        device: str | torch.device = "cpu",
    ):
        if "default" not in weights:
            raise BundleInputError(f"per-input REM weights need a 'default' entry, got {sorted(weights)}")
        self.network = network
        self.weights = {k: str(v) for k, v in weights.items()}
        self.zoom_key, self.name_key = zoom_key, name_key
        self.device = device
        self.loaded: str | None = None

    def path_for(self, kind: str) -> str:
        """The weights file of ``kind`` (the default one when that kind has no file)."""
        path = self.weights.get(kind)
        return path if path and Path(path).is_file() else self.weights["default"]

    def attach(self, engine) -> None:
        """Choose the weights at the start of every iteration (one case per iteration)."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self)

    def __call__(self, engine) -> None:
        batch = engine.state.batch
        zoom = batch[self.zoom_key] if isinstance(batch, Mapping) else batch[0][self.zoom_key]
        zoom = torch.as_tensor(zoom).reshape(-1, 3)
        kinds = {degradation_kind(z.tolist()) for z in zoom}
        if len(kinds) != 1:
            raise BundleInputError(f"one batch holds inputs of different kinds {sorted(kinds)}: use batch size 1")
        kind = kinds.pop()
        path = self.path_for(kind)
        if path != self.loaded:
            state = checked_state(path, self.network, "per-input REM weights (rem_sr models/)")
            unwrap(self.network).load_state_dict({k: v.to(self.device) for k, v in state.items()})
            self.loaded = path
        names = batch.get(self.name_key) if isinstance(batch, Mapping) else None
        name = names[0] if isinstance(names, (list, tuple)) and names else "case"
        print(f"{name}: REM weights {Path(path).name} ({kind} input)", flush=True)
