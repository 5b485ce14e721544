"""Ignite iteration functions for MONAI's SupervisedTrainer / SupervisedEvaluator, and small helpers."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp

from .common import backward_and_step, unwrap
from .metrics import label_one_hot


def _plain(batch: dict, key: str, device) -> torch.Tensor:
    return torch.as_tensor(batch[key]).as_subclass(torch.Tensor).float().to(device)


def _amp(engine: Engine, device: torch.device) -> bool:
    return bool(getattr(engine, "amp", False)) and device.type == "cuda"


class F3RNetTrainStep:
    """
    One unsupervised F3RNet optimisation step, as the ``iteration_update`` of MONAI's ``SupervisedTrainer``:
    DDF = F3RNet(cat(moving, fixed)) (through DDP when wrapped), warped = Warp(moving, DDF) (bilinear, border
    padding), loss = MIND-SSC(warped, fixed) + lambda * ||grad DDF||^2. Labels are never used.

    With ``amp`` on CUDA the network runs under autocast and the loss in float32, with the trainer's GradScaler.

    Source: Xu et al., "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration",
    Section 2.5, Eq. (3) (the loss, ``scripts.losses.F3RNetLoss``) and Section 2.1 (the spatial transformer, here
    MONAI ``Warp``).

    Args:
        loss_function: a ``scripts.losses.F3RNetLoss`` (its ``components(warped, fixed, ddf)`` is used).
        grad_clip_norm: clip the gradient norm to this value; ``None``, ``""``, ``"None"``, ``"null"`` or 0 disable
            clipping (strings from the command line are accepted).

    Raises:
        ValueError: when ``grad_clip_norm`` is a string that is not a number.
    """

    def __init__(self, loss_function: torch.nn.Module, grad_clip_norm: float | None = None) -> None:
        self.loss_function = loss_function
        self.grad_clip_norm = float(grad_clip_norm) if grad_clip_norm not in (None, "", "None", "null") else None
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def __call__(self, engine: Engine, batch: dict) -> dict:
        """
        Args:
            engine: the trainer; uses ``engine.state.device``, ``engine.network``, ``engine.optimizer``,
                ``engine.amp`` and ``engine.scaler``.
            batch: a dict with ``moving_image`` and ``fixed_image``, each in shape [B, 1, D, H, W] (intensities in
                [0, 1] after ``NormalizeCTMRd``).

        Returns:
            Python floats: ``loss``, ``similarity``, ``smoothness`` (see ``F3RNetLoss.components``) and
            ``max_abs_ddf`` (the largest displacement, voxels).

        Raises:
            KeyError: when one of the batch keys is missing.
        """
        device = engine.state.device
        moving, fixed = _plain(batch, "moving_image", device), _plain(batch, "fixed_image", device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            # through the trainer's inferer (train#inferer), so a config or MONAI Label can swap it
            ddf = engine.inferer(torch.cat([moving, fixed], dim=1), engine.network)
        ddf = ddf.float()
        parts = self.loss_function.components(self.warp(moving, ddf), fixed, ddf)
        backward_and_step(engine, parts["loss"], self.grad_clip_norm, _amp(engine, device))
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["max_abs_ddf"] = float(ddf.detach().abs().max())
        return out


class F3RNetEvalStep:
    """
    Validation on one full-volume pair, as the ``iteration_update`` of MONAI's ``SupervisedEvaluator``: the moving
    label is warped (nearest neighbour, zero padding; MONAI ``Warp``) with the predicted DDF; returns one-hot
    ``pred`` (warped moving label) and ``label`` (fixed label) for MONAI's ``MeanDice``.

    Args:
        num_classes: number of label classes including the background (5 for the bundle's label map: 0 background,
            1 liver, 2 spleen, 3 right kidney, 4 left kidney).
    """

    def __init__(self, num_classes: int = 5) -> None:
        self.num_classes = int(num_classes)
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        """
        Args:
            engine: the evaluator; uses ``engine.state.device``, ``engine.network`` and ``engine.amp``.
            batch: a dict with ``moving_image``, ``fixed_image``, ``moving_label`` and ``fixed_label``, each in
                shape [B, 1, D, H, W].

        Returns:
            ``{"pred": [B, num_classes, D, H, W], "label": [B, num_classes, D, H, W]}``, one-hot.

        Raises:
            KeyError: when one of the batch keys is missing.
        """
        device = engine.state.device
        pair = torch.cat([_plain(batch, "moving_image", device), _plain(batch, "fixed_image", device)], dim=1)
        engine.network.eval()
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            ddf = unwrap(engine.network)(pair)
        warped = self.warp_label(_plain(batch, "moving_label", device), ddf.float())
        fixed = _plain(batch, "fixed_label", device)
        return {"pred": label_one_hot(warped, self.num_classes), "label": label_one_hot(fixed, self.num_classes)}


class F3RNetInferStep:
    """
    Inference iteration, as the ``iteration_update`` of MONAI's ``SupervisedEvaluator``: the network runs once on
    the stacked pair ``image`` (moving, fixed) and returns the DDF as ``pred``, a MetaTensor with the input's
    (batched) metadata, so the outputs keep the input affine. The network runs through the evaluator's ``inferer``
    (inference.json: ``scripts.fast_inference.InferenceModeInferer``: inference mode and, on a CPU with native
    bfloat16, bf16 autocast); with ``amp`` on CUDA under float16 autocast. With `io`
    (``scripts.instance_optimisation.InstanceOptimisation``), the DDF is then refined for the pair by instance
    optimisation (MIND-SSC); ``engine.state.io_seconds`` holds its time.

    Args:
        io: the instance optimisation, or ``None`` (the network's field alone).
    """

    def __init__(self, io=None) -> None:
        self.io = io

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        """
        Args:
            engine: the evaluator; uses ``engine.state.device``, ``engine.network`` and ``engine.amp``, and fires
                ``FORWARD_COMPLETED`` and ``MODEL_COMPLETED`` (MONAI's decollation and postprocessing).
            batch: a dict with ``image``, a MetaTensor [B, 2, D, H, W] (moving and fixed stacked as channels).

        Returns:
            ``engine.state.output = {"pred": DDF}``, the DDF [B, 3, D, H, W] in voxels as a batched float32 CPU
            MetaTensor with the input's metadata.

        Raises:
            KeyError: when ``image`` is missing from the batch.
            ValueError: when ``image`` is not in shape [B, 2, D, H, W] (raised by :class:`F3RNet`).
        """
        image = batch["image"]
        device = engine.state.device
        engine.network.eval()
        pair = torch.as_tensor(image).as_subclass(torch.Tensor).float().to(device)
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            # through the evaluator's inferer (inference.json: inference mode, bf16 on the CPU, see `precision`)
            ddf = engine.inferer(pair, unwrap(engine.network))
        engine.state.io_seconds = None
        if self.io is not None and self.io.enabled:
            start = time.perf_counter()
            ddf = self.io(ddf.float(), pair[:, :1], pair[:, 1:])
            engine.state.io_seconds = time.perf_counter() - start
        # on the CPU: postprocessing warps the raw moving image (a CPU tensor) and writes NIfTI files
        pred = MetaTensor(ddf.float().cpu(), meta=image.meta, applied_operations=[])
        pred.is_batch = True
        engine.state.output = {"pred": pred}
        # MONAI's decollation and postprocessing run on these events (its default iteration fires them)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
