"""Ignite iteration functions for MONAI's SupervisedTrainer / SupervisedEvaluator, and small helpers."""

from __future__ import annotations

import time

import torch
from ignite.engine import Engine
from ignite.metrics import Average
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp

from .common import backward_and_step, unwrap
from .metrics import mean_label_dice


def _device_type(device: torch.device | str) -> str:
    """``"cuda"``, ``"cpu"``, ... of a device (a separate function so that tests can mock a CUDA device)."""
    return torch.device(device).type


def _amp(engine: Engine, device: torch.device | str) -> bool:
    """Mixed precision is on when the engine was built with ``amp=True`` and the device is CUDA (never on CPU)."""
    return bool(getattr(engine, "amp", False)) and _device_type(device) == "cuda"


def _float(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.float()


class RegistrationTrainStep:
    """
    One ReFDRN optimisation step on a (cropped) pair, as the ``iteration_update`` of MONAI's ``SupervisedTrainer``.

    The batch holds the trilinear-upsampled LR images (``moving_image_lr``, ``fixed_image_lr``) and REM's
    outputs on them (``moving_sr``, ``fixed_sr``, computed once per volume by `EnhancePaird`). The network
    gets the SR pair (``precomputed_sr=True``, through DDP when wrapped); the loss applies REM again to the
    warped LR moving image (L_aux), so gradients flow through the frozen REM.

    With the trainer's ``amp`` on and a CUDA device, the network runs under ``torch.autocast`` and the loss in
    float32 (its outputs are cast back), with the trainer's ``GradScaler`` (``engine.scaler``) when it has one; on
    CPU, ``amp`` is ignored.

    Source: the loss is Eq. (3) of K. Sun and S. Simon, "A Resolution Enhancement Plug-in for Deformable
    Registration of Medical Images", Section III-B (see ``scripts.losses.ReFDRNLoss``); mixed precision follows
    ``torch.autocast`` / ``torch.cuda.amp.GradScaler``.

    Args:
        loss_function: a ``scripts.losses.ReFDRNLoss`` (called with the DDF, the LR pair, the SR pair, the
            auxiliary DDF and the iteration; returns a dict of scalar tensors with ``"loss"``).
        grad_clip_norm: clip the gradient norm to this value; ``None`` or 0 disables clipping.
    """

    def __init__(self, loss_function: torch.nn.Module, grad_clip_norm: float | None = None) -> None:
        self.loss_function = loss_function
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, engine: Engine, batch: dict) -> dict:
        """
        Args:
            engine: the trainer; uses ``engine.state.device``, ``engine.state.iteration``, ``engine.network``,
                ``engine.optimizer``, ``engine.amp`` and ``engine.scaler``.
            batch: a dict with ``moving_image_lr``, ``fixed_image_lr`` (trilinear-upsampled LR images) and
                ``moving_sr``, ``fixed_sr`` (their REM outputs), each in shape [B, 1, D, H, W].

        Returns:
            the loss components as Python floats: ``loss``, ``main``, ``aux``, ``reg``, ``aux_ddf_loss`` and
            ``aux_ddf_weight`` (see ``ReFDRNLoss.forward``).

        Raises:
            KeyError: when one of the batch keys is missing.
        """
        device = engine.state.device
        take = lambda key: torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(device)  # noqa: E731
        moving, fixed = take("moving_image_lr"), take("fixed_image_lr")
        sr_pair = torch.cat([take("moving_sr"), take("fixed_sr")], dim=1)
        use_amp = _amp(engine, device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=_device_type(device), enabled=use_amp):
            # through the trainer's inferer (train#inferer), so a config or MONAI Label can swap it
            out = engine.inferer(sr_pair, engine.network, precomputed_sr=True, return_dict=True)
        losses = self.loss_function(
            _float(out["ddf"]),
            moving,
            fixed,
            _float(out["sr_moving"]),
            _float(out["sr_fixed"]),
            aux_ddf=_float(out.get("aux_ddf")),
            iteration=engine.state.iteration,
        )
        backward_and_step(engine, losses["loss"], self.grad_clip_norm, use_amp)
        return {k: float(v.detach()) for k, v in losses.items()}


class RegistrationEvalStep:
    """
    Validation on one full-volume pair, as the ``iteration_update`` of MONAI's ``SupervisedEvaluator``: the cascade
    predicts the DDF, the moving label is warped with it (nearest neighbour, zero padding; MONAI ``Warp``) and the
    mean label Dice against the fixed label is returned. With the evaluator's ``amp`` on a CUDA device the network
    runs under ``torch.autocast``.
    """

    def __init__(self) -> None:
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        """
        Args:
            engine: the evaluator; uses ``engine.state.device``, ``engine.network`` and ``engine.amp``.
            batch: a dict with ``moving_image_lr``, ``fixed_image_lr`` (trilinear-upsampled LR images) and
                ``moving_label``, ``fixed_label`` (label maps), each in shape [1, 1, D, H, W] (batch size 1).

        Returns:
            ``{"dice": float}``: the mean Dice over the labels of the warped moving and the fixed label map.

        Raises:
            KeyError: when one of the batch keys is missing.
        """
        device = engine.state.device
        pair = torch.cat([batch["moving_image_lr"], batch["fixed_image_lr"]], dim=1)
        pair = pair.as_subclass(torch.Tensor).to(device)
        engine.network.eval()
        with torch.autocast(device_type=_device_type(device), enabled=_amp(engine, device)):
            ddf = unwrap(engine.network)(pair)
        ddf = ddf.float()
        warped = self.warp_label(batch["moving_label"].as_subclass(torch.Tensor).float().to(device), ddf)
        dice = mean_label_dice(warped[0, 0].cpu(), batch["fixed_label"][0, 0].as_subclass(torch.Tensor))
        return {"dice": dice}


def output_average(key: str) -> Average:
    """An ignite metric averaging ``engine.state.output[key]`` over the epoch."""
    return Average(output_transform=lambda output: output[key])


def loss_output(key: str = "loss"):
    """output_transform for StatsHandler / TensorBoardStatsHandler."""
    return lambda output: output[key]


class RegistrationInferStep:
    """
    Inference iteration, as the ``iteration_update`` of MONAI's ``SupervisedEvaluator``: the cascade runs once on
    the stacked LR pair ``image`` and returns the DDF as ``pred`` plus both SR images, so postprocessing can save
    them without running REM again. The cascade runs through the evaluator's ``inferer`` (inference.json:
    ``scripts.fast_inference.InferenceModeInferer``, i.e. inference mode and, on a CPU with native bfloat16, bf16
    autocast). With the evaluator's ``amp`` on a CUDA device it runs under ``torch.autocast`` (float16). Outputs
    are cast back to float32.

    With `io` (``scripts.instance_optimisation.InstanceOptimisation``, inference.json's ``io``), the network's DDF is
    then refined for the pair by instance optimisation on the SR pair (LNCC, the cascade's own similarity); the
    saved DDF, warped image and label are the refined ones. ``engine.state.io_seconds`` holds IO's time.

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
            batch: a dict with ``image``, a MetaTensor [B, 2, D, H, W] (trilinear-upsampled LR moving and fixed
                images stacked as channels).

        Returns:
            ``engine.state.output``: ``{"pred": DDF [B, 3, D, H, W] in voxels, "sr_moving": [B, 1, D, H, W],
            "sr_fixed": [B, 1, D, H, W]}``, batched MetaTensors carrying the input's metadata (grid and affine).

        Raises:
            KeyError: when ``image`` is missing from the batch.
            ValueError: when ``image`` is not in shape [B, 2, D, H, W] (raised by the cascade).
        """
        image = batch["image"]
        device = engine.state.device
        engine.network.eval()
        pair = torch.as_tensor(image).as_subclass(torch.Tensor).to(device)
        with torch.autocast(device_type=_device_type(device), enabled=_amp(engine, device)):
            # through the evaluator's inferer (inference.json: inference mode, bf16 on the CPU, see `precision`)
            out = engine.inferer(pair, unwrap(engine.network), return_dict=True)
        out = {k: v.float() for k, v in out.items()}
        engine.state.io_seconds = None
        if self.io is not None and self.io.enabled:
            start = time.perf_counter()
            out["ddf"] = self.io(out["ddf"], out["sr_moving"], out["sr_fixed"])
            engine.state.io_seconds = time.perf_counter() - start

        def with_input_meta(x: torch.Tensor) -> MetaTensor:
            # outputs live on the input grid: give them its (batched) affine and file name
            wrapped = MetaTensor(x, meta=image.meta, applied_operations=[])
            wrapped.is_batch = True
            return wrapped

        engine.state.output = {
            k: with_input_meta(out[v])
            for k, v in (("pred", "ddf"), ("sr_moving", "sr_moving"), ("sr_fixed", "sr_fixed"))
        }
        # MONAI's decollation and postprocessing run on this event (its default iteration fires it)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
