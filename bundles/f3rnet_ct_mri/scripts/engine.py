"""Ignite iteration functions for MONAI's SupervisedTrainer / SupervisedEvaluator, and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.data import MetaTensor
from monai.engines.utils import IterationEvents
from monai.networks.blocks import Warp

from .metrics import label_one_hot


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a DistributedDataParallel / DataParallel wrapper."""
    return network.module if hasattr(network, "module") else network


def _plain(batch: dict, key: str, device) -> torch.Tensor:
    return torch.as_tensor(batch[key]).as_subclass(torch.Tensor).float().to(device)


def _amp(engine: Engine, device: torch.device) -> bool:
    return bool(getattr(engine, "amp", False)) and device.type == "cuda"


class F3RNetTrainStep:
    """One unsupervised step (the paper's Eq. 3): DDF = F3RNet(cat(moving, fixed)) (through DDP when wrapped),
    warped = Warp(moving, DDF), loss = MIND-SSC(warped, fixed) + lambda * ||grad DDF||^2. Labels are never used.

    With ``amp`` on CUDA the network runs under autocast and the loss in float32, with the trainer's GradScaler.
    """

    def __init__(self, loss_function: torch.nn.Module, grad_clip_norm: float | None = None) -> None:
        self.loss_function = loss_function
        self.grad_clip_norm = float(grad_clip_norm) if grad_clip_norm not in (None, "", "None", "null") else None
        self.warp = Warp(mode="bilinear", padding_mode="border")

    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = engine.state.device
        moving, fixed = _plain(batch, "moving_image", device), _plain(batch, "fixed_image", device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            ddf = engine.network(torch.cat([moving, fixed], dim=1))
        ddf = ddf.float()
        parts = self.loss_function.components(self.warp(moving, ddf), fixed, ddf)
        scaler = getattr(engine, "scaler", None) if _amp(engine, device) else None
        if scaler is not None:
            scaler.scale(parts["loss"]).backward()
            if self.grad_clip_norm:
                scaler.unscale_(engine.optimizer)
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
            scaler.step(engine.optimizer)
            scaler.update()
        else:
            parts["loss"].backward()
            if self.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
            engine.optimizer.step()
        out = {k: float(v.detach()) for k, v in parts.items()}
        out["max_abs_ddf"] = float(ddf.detach().abs().max())
        return out


class F3RNetEvalStep:
    """Validation on one full-volume pair: the moving label is warped (nearest neighbour) with the predicted
    DDF; returns one-hot ``pred`` (warped moving label) and ``label`` (fixed label) for MONAI's MeanDice."""

    def __init__(self, num_classes: int = 5) -> None:
        self.num_classes = int(num_classes)
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        device = engine.state.device
        pair = torch.cat([_plain(batch, "moving_image", device), _plain(batch, "fixed_image", device)], dim=1)
        engine.network.eval()
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            ddf = unwrap(engine.network)(pair)
        warped = self.warp_label(_plain(batch, "moving_label", device), ddf.float())
        fixed = _plain(batch, "fixed_label", device)
        return {"pred": label_one_hot(warped, self.num_classes), "label": label_one_hot(fixed, self.num_classes)}


class F3RNetInferStep:
    """Inference iteration: the network runs once on the stacked pair ``image`` (moving, fixed) and returns the
    DDF as ``pred``, a MetaTensor with the input's (batched) metadata, so the outputs keep the input affine."""

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict) -> dict:
        image = batch["image"]
        device = engine.state.device
        engine.network.eval()
        with torch.autocast(device_type=device.type, enabled=_amp(engine, device)):
            ddf = unwrap(engine.network)(torch.as_tensor(image).as_subclass(torch.Tensor).float().to(device))
        # on the CPU: postprocessing warps the raw moving image (a CPU tensor) and writes NIfTI files
        pred = MetaTensor(ddf.float().cpu(), meta=image.meta, applied_operations=[])
        pred.is_batch = True
        engine.state.output = {"pred": pred}
        # MONAI's decollation and postprocessing run on these events (its default iteration fires them)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ProgressBarHandler:
    """Ignite's progress bar (with the running loss when `show_loss`); MONAI engines call ``attach(engine)``."""

    def __init__(self, show_loss: bool = True) -> None:
        self.show_loss = show_loss

    def attach(self, engine: Engine) -> None:
        if self.show_loss:
            ProgressBar(persist=False).attach(engine, output_transform=lambda o: {"loss": o["loss"]})
        else:
            ProgressBar(persist=False).attach(engine)


def save_state_dict_on_cpu(path: str, export_path: str | None = None) -> None:
    """Re-save a checkpoint as a plain state dict of CPU tensors (atomic), if it exists, in place or as
    `export_path` (e.g. models/model_all.pt for the F3RNet-w/ F3D row of evaluate.json)."""
    if not os.path.isfile(path):
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v.detach().cpu().contiguous() for k, v in state.items()}
    target = Path(export_path or path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".partial-{target.name}")
    torch.save(state, tmp)
    os.replace(tmp, target)
