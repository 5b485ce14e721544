"""Training helpers referenced by train.json: the learning-rate schedule, the progress bar and
the final CPU re-save of the selected weights."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar


class StepDecayWithFloor:
    """Multiplicative LR factor: ``gamma ** (iteration // step)``, never below ``min_lr / base_lr``.

    The paper's schedules (REM: 1e-3 x 0.95 every 200 iterations down to 1e-4) as a `LambdaLR`
    factor. A class, not a lambda, so that the scheduler's state dict can be checkpointed.
    """

    def __init__(self, base_lr: float, gamma: float, step: int, min_lr: float) -> None:
        if step < 1 or not 0 < gamma <= 1 or base_lr <= 0:
            raise ValueError("StepDecayWithFloor needs step >= 1, 0 < gamma <= 1 and base_lr > 0")
        self.base_lr, self.gamma, self.step, self.min_lr = base_lr, gamma, step, min_lr

    def __call__(self, iteration: int) -> float:
        return max(self.gamma ** (iteration // self.step), self.min_lr / self.base_lr)


class ProgressBarHandler:
    """Ignite's progress bar showing the running loss; MONAI engines call ``attach(engine)``."""

    def __init__(self, loss_key: str = "loss", persist: bool = False) -> None:
        self.loss_key = loss_key
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        def output_transform(output):
            first = output[0] if isinstance(output, list) else output
            if isinstance(first, dict) and self.loss_key in first:
                return {self.loss_key: float(first[self.loss_key])}
            return None

        ProgressBar(persist=self.persist).attach(engine, output_transform=output_transform)


def save_state_dict_on_cpu(path: str) -> None:
    """Re-save a checkpoint as a plain state dict of CPU tensors (atomic), if it exists."""
    if not os.path.isfile(path):
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and set(state) == {"model"}:
        state = state["model"]
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = Path(path).with_name(f".partial-{Path(path).name}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the network itself)."""
    return network.module if hasattr(network, "module") else network
