"""Helpers that every bundle of this package needs: input checks, weight checks, atomic writers,
the command-line boolean parser and the training utilities.

This file is a deliberate, identical copy in ``bundles/{rem_sr,refdrn,f3rnet_ct_mri}/scripts/common.py``,
so that each bundle keeps working when it is copied out on its own. Edit the copy in ``rem_sr`` and run
``python tools/sync_common.py``; ``tests/test_common_copies.py`` fails while the copies differ.

Every check raises :class:`BundleInputError`, whose message names the file and the problem, before any
output is written.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.data import NibabelWriter, decollate_batch, load_decathlon_datalist
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction, str2bool

__all__ = [
    "AtomicNibabelWriter",
    "BundleInputError",
    "CaseNames",
    "PerCaseMetric",
    "PerCaseValueMetric",
    "ProgressBarHandler",
    "StepDecayWithFloor",
    "atomic_write_bytes",
    "atomic_write_text",
    "backward_and_step",
    "case_name",
    "check_volume_file",
    "check_weights",
    "checked_state",
    "config_flag",
    "count_parameters",
    "load_checked_weights",
    "load_datalist",
    "save_state_dict_on_cpu",
    "unwrap",
    "volume_header",
]


class BundleInputError(ValueError):
    """Invalid user input. The message names the file (or the config key) and what is wrong with it."""


# ---------------------------------------------------------------------------------------------- input files
def load_datalist(datalist: str, dataset_dir: str, section: str, hint: str = "") -> list[dict]:
    """Read one section of a Decathlon-style datalist, with paths resolved against `dataset_dir`.

    Args:
        datalist: path of the JSON file (``{"training": [...], "validation": [...], "test": [...]}``).
        dataset_dir: folder that relative paths in the items are resolved against.
        section: the list to read, e.g. ``"test"``.
        hint: appended to the "not found" message, e.g. the command that builds the sample data.

    Returns:
        the items of `section`, paths made absolute (``monai.data.load_decathlon_datalist``).

    Raises:
        BundleInputError: the file is missing, is not JSON, or `section` is missing or empty.
    """
    if not os.path.isfile(datalist):
        how = f" {hint.strip()}" if hint else ""
        raise BundleInputError(
            f"datalist not found: {datalist}.{how} Or pass --datalist <your.json> --dataset_dir <folder>."
        )
    try:
        content = json.loads(Path(datalist).read_text())
    except json.JSONDecodeError as e:
        raise BundleInputError(f"datalist {datalist} is not valid JSON: {e}") from None
    if not isinstance(content, dict) or not content.get(section):
        raise BundleInputError(f"datalist {datalist} has no items in its '{section}' list")
    return load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=section, base_dir=dataset_dir)


def volume_header(
    path: str, min_size: int | Sequence[int] = 1, check_values: bool = True
) -> nib.spatialimages.SpatialImage:
    """Check that `path` is a readable single-channel 3D volume, at least `min_size` voxels per axis.

    Args:
        path: a NIfTI or Analyze file. A 4D/5D file with trailing singleton axes counts as 3D.
        min_size: smallest allowed size per spatial axis (an int for all three, or three ints).
        check_values: also read the data and reject NaN or infinite values.

    Returns:
        the nibabel image (header and affine; the data is only read when `check_values`).

    Raises:
        BundleInputError: missing or unreadable file, not 3D, smaller than `min_size`, non-finite values.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        raise BundleInputError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises several types for unreadable files
        raise BundleInputError(f"{path}: not a readable NIfTI/Analyze image ({e})") from None
    shape = tuple(int(s) for s in img.shape)
    spatial = shape[:3] if len(shape) > 3 and all(s == 1 for s in shape[3:]) else shape
    if len(spatial) != 3:
        raise BundleInputError(f"{path}: expected a 3D volume, got shape {shape}")
    mins = [int(min_size)] * 3 if np.isscalar(min_size) else [int(m) for m in min_size]
    if any(s < m for s, m in zip(spatial, mins)):
        raise BundleInputError(f"{path}: shape {spatial} is smaller than the minimum {tuple(mins)} for this network")
    if check_values:
        data = np.asanyarray(img.dataobj)
        if not np.all(np.isfinite(data)):
            raise BundleInputError(
                f"{path}: contains NaN or infinite values ({int((~np.isfinite(data)).sum())} voxels)"
            )
    return img


def check_volume_file(path: str, min_size: int | Sequence[int] = 1) -> tuple[int, ...]:
    """`volume_header` with the value check; returns the spatial shape ``(X, Y, Z)`` in voxels.

    Raises:
        BundleInputError: as `volume_header`.
    """
    return tuple(int(s) for s in volume_header(path, min_size).shape[:3])


def config_flag(value, name: str) -> bool:
    """A boolean config key given as a bool, 0/1, or the string a command line produces.

    ``--key false`` reaches a config as the string ``"false"``, which Python would call true; this parses it
    with ``monai.utils.str2bool`` (yes/no, true/false, t/f, y/n, 1/0, any case).

    Raises:
        BundleInputError: `value` is none of these; the message names the key `name`.
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    try:
        return str2bool(value.strip() if isinstance(value, str) else value, raise_exc=True)
    except (ValueError, TypeError, AttributeError):
        raise BundleInputError(f"{name} must be true or false, got {value!r}") from None


# -------------------------------------------------------------------------------------------------- weights
def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper, or `network` itself."""
    return network.module if isinstance(getattr(network, "module", None), torch.nn.Module) else network


def count_parameters(module: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those with ``requires_grad`` when `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _plain_state(state) -> dict | None:
    """A state dict from what ``torch.load`` returned: a training checkpoint's ``"model"`` entry is
    unwrapped, and DDP's ``module.`` prefix is removed."""
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        return None
    return {str(k).removeprefix("module."): v for k, v in state.items()}


def checked_state(path: str, network: torch.nn.Module, hint: str = "") -> dict:
    """The state dict at `path`, if its keys and tensor shapes fit `network` exactly.

    Accepts a plain state dict, a training checkpoint with a ``"model"`` entry (as MONAI's ``CheckpointSaver``
    writes) and weights saved from a DDP-wrapped network (``module.`` prefix). `network` may itself be DDP-wrapped.

    Args:
        path: the weights file.
        network: the configured network.
        hint: appended to the mismatch message (e.g. which config keys decide the architecture).

    Raises:
        BundleInputError: missing file, not loadable with ``weights_only=True``, or keys/shapes that differ
            (the message counts missing, unexpected and wrongly shaped tensors, with one example each).
    """
    if not os.path.isfile(path):
        raise BundleInputError(f"{path}: weights file not found")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleInputError(f"{path}: not a loadable PyTorch state dict ({str(e).splitlines()[0]})") from None
    module = unwrap(network)
    state = _plain_state(loaded)
    if state is None:
        raise BundleInputError(f"{path}: not a loadable PyTorch state dict (found a {type(loaded).__name__})")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"{len(wrong)} of wrong shape (e.g. {wrong[0]}: {found[wrong[0]]} vs {expected[wrong[0]]})")
        raise BundleInputError(
            f"{path}: weights do not match the configured network {type(module).__name__}: "
            + "; ".join(details)
            + (f". {hint.strip()}" if hint else "")
        )
    return state


def check_weights(path: str, network: torch.nn.Module, hint: str = "") -> str:
    """`checked_state` for configs (a ``run`` entry before the engine starts); returns `path`.

    Raises:
        BundleInputError: as `checked_state`.
    """
    checked_state(path, network, hint)
    return path


def load_checked_weights(path: str, network: torch.nn.Module, hint: str = "") -> torch.nn.Module:
    """Load the weights at `path` into `network` (unwrapped from DDP) after `checked_state`'s checks.

    Returns:
        `network`.

    Raises:
        BundleInputError: as `checked_state`.
    """
    unwrap(network).load_state_dict(checked_state(path, network, hint))
    return network


def save_state_dict_on_cpu(path: str, export_path: str | None = None) -> None:
    """Re-save a checkpoint as a plain state dict of contiguous CPU tensors, atomically, if it exists.

    A ``{"model": ...}`` checkpoint is unwrapped and DDP's ``module.`` prefix removed, so the result loads with
    ``torch.load(..., weights_only=True)`` into the bare network. Written in place, or to `export_path`.
    A missing `path` (nothing trained) is not an error: nothing is written.
    """
    if not os.path.isfile(path):
        return
    state = _plain_state(torch.load(path, map_location="cpu", weights_only=True))
    if state is None:
        raise BundleInputError(f"{path}: not a state dict or a training checkpoint with a 'model' entry")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    target = Path(export_path or path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".partial-{uuid.uuid4().hex[:8]}-{target.name}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------- case names
def case_name(item: Mapping, image_key: str = "image") -> str:
    """The name of one case: the datalist item's ``name`` when given, else the stem of `image_key`'s file name.

    Args:
        item: a datalist item, or one (decollated) item of an engine's batch, where `image_key` is a
            ``MetaTensor`` whose ``filename_or_obj`` meta entry holds the path.
        image_key: the image that names the case (``"image"``; ``"moving_image"`` for registration pairs).

    Returns:
        e.g. ``"case010"`` for ``{"name": "case010"}``, ``"sub01_T1w"`` for ``.../sub01_T1w.nii.gz``.
    """
    name = item.get("name")
    if name:
        return str(name)
    source = item.get(image_key)
    path = getattr(source, "meta", {}).get("filename_or_obj", source) if source is not None else None
    return Path(str(path)).name.split(".")[0] if path else "case"


class CaseNames:
    """``MetricsSaver``'s ``batch_transform``: one ``{"filename_or_obj": case name}`` per case of the batch, so the
    rows of its ``<metric>_raw.csv`` files are named by case (`case_name`).

    Args:
        image_key: the image that names a case without a ``name`` entry.
    """

    def __init__(self, image_key: str = "image") -> None:
        self.image_key = image_key

    def __call__(self, batch) -> list[dict]:
        """`batch`: ``engine.state.batch``, a list of per-case dicts (decollated) or one collated dict."""
        items = batch if isinstance(batch, list) else decollate_batch(batch, detach=True)
        return [{"filename_or_obj": case_name(item, self.image_key)} for item in items]


# --------------------------------------------------------------------------------------------------- metrics
class PerCaseMetric(CumulativeIterationMetric):
    """Base class of metrics with one value per case: ``_compute_tensor`` returns ``[B, 1]``, and `aggregate`
    reduces the buffer with MONAI's NaN-aware ``do_metric_reduction`` (NaN cases are left out of the mean).
    Subclasses plug into ``IgniteMetricHandler`` and ``MetricsSaver`` like MONAI's own metrics.

    Args:
        reduction: how `aggregate` reduces the per-case values (MONAI ``MetricReduction``, default mean).
        get_not_nans: `aggregate` also returns the number of non-NaN cases.
    """

    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False) -> None:
        super().__init__()
        self.reduction = reduction
        self.get_not_nans = get_not_nans

    def aggregate(self, reduction: MetricReduction | str | None = None):
        """The reduced value (and the number of non-NaN cases when ``get_not_nans``).

        Raises:
            ValueError: nothing was accumulated as a tensor.
        """
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"the data to aggregate must be a PyTorch Tensor, got {type(data)}")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class PerCaseValueMetric(PerCaseMetric):
    """Collects a number the iteration computed per case, e.g. the forward time in seconds.

    ``y_pred``: ``[B]`` or ``[B, 1]`` (or a list of scalars after decollation); ``y`` is ignored.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Returns ``[B, 1]`` float64 on the CPU.

        Raises:
            ValueError: more than one number per case.
        """
        values = torch.as_tensor(y_pred).as_subclass(torch.Tensor).detach().double().cpu()
        values = values.reshape(1, -1) if values.ndim == 0 else values.reshape(values.shape[0], -1)
        if values.shape[1] != 1:
            raise ValueError(f"PerCaseValueMetric expects one value per case, got shape {tuple(values.shape)}")
        return values


# -------------------------------------------------------------------------------------------------- writing
def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> Path:
    """Write `payload` to a temporary file beside `path` and rename it into place (parents created), so an
    interrupted run never leaves a half-written file. Returns the path."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".partial-{uuid.uuid4().hex[:8]}-{final.name}")
    try:
        tmp.write_bytes(payload)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` that writes under a temporary name and renames into place.

    Use it as ``SaveImaged(..., writer="scripts.common.AtomicNibabelWriter")``: an interrupted run never
    leaves a half-written NIfTI file behind.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        """Write the image set by ``set_data_array``/``set_metadata`` to `filename` atomically."""
        final = Path(filename)
        final.parent.mkdir(parents=True, exist_ok=True)
        # keep the real suffix (.nii.gz) so nibabel picks the same format for the temporary file
        tmp = final.with_name(f".partial-{uuid.uuid4().hex[:8]}-{final.name}")
        try:
            super().write(str(tmp), verbose=False, **obj_kwargs)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        if verbose:
            print(f"wrote {final}")


# ------------------------------------------------------------------------------------------------- training
class StepDecayWithFloor:
    """Multiplicative learning-rate factor ``gamma ** (iteration // step)``, never below ``min_lr / base_lr``.

    The papers' step schedules as a ``torch.optim.lr_scheduler.LambdaLR`` factor (REM: 1e-3 x 0.95 every 200
    iterations down to 1e-4; ReFDRN: 2e-3 x 0.9 every 1000 iterations down to 1e-4). A class rather than a
    lambda so that the scheduler's state dict can be checkpointed.

    Raises:
        ValueError: ``step < 1``, ``gamma`` outside (0, 1] or ``base_lr <= 0``.
    """

    def __init__(self, base_lr: float, gamma: float, step: int, min_lr: float) -> None:
        if step < 1 or not 0 < gamma <= 1 or base_lr <= 0:
            raise ValueError("StepDecayWithFloor needs step >= 1, 0 < gamma <= 1 and base_lr > 0")
        self.base_lr, self.gamma, self.step, self.min_lr = base_lr, gamma, step, min_lr

    def __call__(self, iteration: int) -> float:
        """The factor for `iteration` (0-based)."""
        return max(self.gamma ** (iteration // self.step), self.min_lr / self.base_lr)


def backward_and_step(
    engine: Engine, loss: torch.Tensor, grad_clip_norm: float | None = None, use_amp: bool = False
) -> None:
    """Backward pass and optimiser step of a custom ``iteration_update``: the loss is scaled by the engine's
    ``GradScaler`` under mixed precision (MONAI's ``SupervisedTrainer`` creates ``engine.scaler`` when ``amp``),
    the gradients are unscaled and their global norm clipped to `grad_clip_norm` when it is set (falsy: no
    clipping), then ``engine.optimizer`` steps.

    Args:
        engine: the trainer; uses ``engine.network``, ``engine.optimizer`` and, under AMP, ``engine.scaler``.
        loss: the scalar loss of the iteration.
        grad_clip_norm: the largest gradient norm (``torch.nn.utils.clip_grad_norm_``), or None/0.
        use_amp: whether the forward pass ran under autocast (only then is the scaler used).
    """
    scaler = getattr(engine, "scaler", None) if use_amp else None
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip_norm:
            scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), grad_clip_norm)
        scaler.step(engine.optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), grad_clip_norm)
        engine.optimizer.step()


class ProgressBarHandler:
    """Ignite's ``ProgressBar`` for a MONAI engine (which calls ``attach(engine)``), with the running loss.

    Args:
        loss_key: the key of the loss in the engine's output (a dict, or a list of dicts); shown when present.
        show_loss: set false for engines without a loss (inference).
        persist: keep the bar on screen after each epoch.
    """

    def __init__(self, loss_key: str = "loss", show_loss: bool = True, persist: bool = False) -> None:
        self.loss_key = loss_key
        self.show_loss = show_loss
        self.persist = persist

    def _loss(self, output) -> dict | None:
        first = output[0] if isinstance(output, list) and output else output
        if isinstance(first, dict) and self.loss_key in first:
            return {self.loss_key: float(first[self.loss_key])}
        return None

    def attach(self, engine: Engine) -> None:
        """Attach the bar to `engine`."""
        transform: Callable | None = self._loss if self.show_loss else None
        if transform is None:
            ProgressBar(persist=self.persist).attach(engine)
        else:
            ProgressBar(persist=self.persist).attach(engine, output_transform=transform)
