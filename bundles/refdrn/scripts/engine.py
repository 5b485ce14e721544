"""Ignite iteration functions for MONAI's SupervisedTrainer / SupervisedEvaluator, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from ignite.metrics import Average
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp

from .metrics import mean_label_dice


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return network.module if hasattr(network, "module") else network


class RegistrationTrainStep:
    """One optimisation step on a (cropped) pair.

    The batch holds the trilinear-upsampled LR images (``moving_image_lr``, ``fixed_image_lr``) and REM's
    outputs on them (``moving_sr``, ``fixed_sr``, computed once per volume by `EnhancePaird`). The network
    gets the SR pair (``precomputed_sr=True``, through DDP when wrapped); the loss applies REM again to the
    warped LR moving image (L_aux), so gradients flow through the frozen REM.
    """

    def __init__(self, loss_function: torch.nn.Module, grad_clip_norm: float | None = None) -> None:
        self.loss_function = loss_function
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = engine.state.device
        take = lambda key: torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(device)  # noqa: E731
        moving, fixed = take("moving_image_lr"), take("fixed_image_lr")
        sr_pair = torch.cat([take("moving_sr"), take("fixed_sr")], dim=1)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        out = engine.network(sr_pair, precomputed_sr=True, return_dict=True)
        losses = self.loss_function(out["ddf"], moving, fixed, out["sr_moving"], out["sr_fixed"],
                                    aux_ddf=out.get("aux_ddf"), iteration=engine.state.iteration)
        losses["loss"].backward()
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
        engine.optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}


class RegistrationEvalStep:
    """Full-volume registration of one pair; returns the label Dice of the warped moving label."""

    def __init__(self) -> None:
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = engine.state.device
        pair = torch.cat([batch["moving_image_lr"], batch["fixed_image_lr"]], dim=1).as_subclass(torch.Tensor).to(device)
        engine.network.eval()
        ddf = unwrap(engine.network)(pair)
        warped = self.warp_label(batch["moving_label"].as_subclass(torch.Tensor).float().to(device), ddf)
        dice = mean_label_dice(warped[0, 0].cpu(), batch["fixed_label"][0, 0].as_subclass(torch.Tensor))
        return {"dice": dice}


def output_average(key: str) -> Average:
    """An ignite metric averaging ``engine.state.output[key]`` over the epoch."""
    return Average(output_transform=lambda output: output[key])


class ProgressBarHandler:
    """Ignite's progress bar with the running loss; MONAI engines call ``attach(engine)``."""

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=False).attach(
            engine, output_transform=lambda o: {"loss": o["loss"]} if isinstance(o, dict) and "loss" in o else None)


def loss_output(key: str = "loss"):
    """output_transform for StatsHandler / TensorBoardStatsHandler."""
    return lambda output: output[key]


class StepDecayWithFloor:
    """LambdaLR factor ``gamma ** (iteration // step)``, never below ``min_lr / base_lr`` (the paper's schedule:
    2e-3 x 0.9 every 1000 iterations down to 1e-4). A class, so the scheduler state can be checkpointed."""

    def __init__(self, base_lr: float, gamma: float, step: int, min_lr: float) -> None:
        if step < 1 or not 0 < gamma <= 1 or base_lr <= 0:
            raise ValueError("StepDecayWithFloor needs step >= 1, 0 < gamma <= 1 and base_lr > 0")
        self.base_lr, self.gamma, self.step, self.min_lr = base_lr, gamma, step, min_lr

    def __call__(self, iteration: int) -> float:
        return max(self.gamma ** (iteration // self.step), self.min_lr / self.base_lr)


def save_state_dict_on_cpu(path: str, export_path: str | None = None) -> None:
    """Re-save a checkpoint as a plain state dict of CPU tensors (atomic), if it exists, in place or as
    `export_path` (e.g. models/backbone_x4.pt for the "backbone↓↑" row of evaluate.json)."""
    if not os.path.isfile(path):
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    target = Path(export_path or path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".partial-{target.name}")
    torch.save(state, tmp)
    os.replace(tmp, target)


class RegistrationInferStep:
    """Inference iteration: the cascade runs once on the stacked LR pair ``image`` and returns the DDF as
    ``pred`` plus both SR images, so postprocessing can save them without running REM again."""

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        image = batch["image"]
        engine.network.eval()
        out = unwrap(engine.network)(torch.as_tensor(image).as_subclass(torch.Tensor).to(engine.state.device),
                                     return_dict=True)

        def with_input_meta(x: torch.Tensor) -> MetaTensor:
            # outputs live on the input grid: give them its (batched) affine and file name
            wrapped = MetaTensor(x, meta=image.meta, applied_operations=[])
            wrapped.is_batch = True
            return wrapped

        engine.state.output = {k: with_input_meta(out[v]) for k, v in
                               (("pred", "ddf"), ("sr_moving", "sr_moving"), ("sr_fixed", "sr_fixed"))}
        # MONAI's decollation and postprocessing run on this event (its default iteration fires it)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
