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
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from monai.data import MetaTensor, NibabelWriter, decollate_batch, load_decathlon_datalist
from monai.metrics import CumulativeIterationMetric
from monai.metrics.utils import do_metric_reduction
from monai.transforms import MapTransform, Orientation
from monai.utils import MetricReduction, str2bool

__all__ = [
    "AtomicNibabelWriter",
    "BundleInputError",
    "CaseNamed",
    "CaseNames",
    "OutputPathsHandler",
    "PerCaseMetric",
    "PerCaseValueMetric",
    "RestoreOrientationd",
    "ProgressBarHandler",
    "StepDecayWithFloor",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_dir",
    "check_override_keys",
    "check_resume_checkpoint",
    "backward_and_step",
    "case_name",
    "check_volume_file",
    "check_weights",
    "checked_state",
    "config_flag",
    "count_parameters",
    "load_checked_weights",
    "load_datalist",
    "original_affine",
    "save_state_dict_on_cpu",
    "unique_case_names",
    "unwrap",
    "use_bundle_scripts",
    "volume_header",
]


class BundleInputError(ValueError):
    """Invalid user input. The message names the file (or the config key) and what is wrong with it."""


# ---------------------------------------------------------------------------------------------- input files
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr", ".mha", ".mhd", ".nrrd")


def load_datalist(datalist: str, dataset_dir: str, section: str, hint: str = "") -> list[dict]:
    """Read one section of a Decathlon-style datalist, with paths resolved against `dataset_dir`.

    Args:
        datalist: path of the JSON file (``{"training": [...], "validation": [...], "test": [...]}``).
        dataset_dir: folder that relative paths in the items are resolved against.
        section: the list to read, e.g. ``"test"`` (the configs' ``data_section``).
        hint: appended to the "not found" message, e.g. the command that builds the sample data.

    Returns:
        the items of `section`; every image path (a value ending in .nii, .nii.gz, .img, .hdr, .mha, .mhd or
        .nrrd, under any key) resolved against `dataset_dir` unless absolute.

    Raises:
        BundleInputError: the file is missing or is not JSON; `section` is missing or empty (the message lists the
            sections that exist and names ``--data_section``); an image path of an item does not exist (the message
            names the item, the key and, for a relative path, the ``dataset_dir`` it was resolved against).
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
    if not isinstance(content, dict) or not isinstance(content.get(section), list) or not content[section]:
        sections = [k for k, v in content.items() if isinstance(v, list) and v] if isinstance(content, dict) else []
        raise BundleInputError(
            f"datalist {datalist} has no items in its '{section}' list; it has "
            + (", ".join(f"'{k}'" for k in sections) if sections else "no non-empty list")
            + ". Choose one with --data_section <name>."
        )
    items = load_decathlon_datalist(datalist, is_segmentation=False, data_list_key=section, base_dir=dataset_dir)
    for index, (raw, item) in enumerate(zip(content[section], items)):
        if not isinstance(raw, dict):
            raise BundleInputError(f"datalist {datalist}: item {index} of '{section}' is not an object: {raw!r}")
        for key, value in raw.items():
            if not isinstance(value, str):
                continue
            if not value.lower().endswith(IMAGE_SUFFIXES):
                # MONAI joins any string with dataset_dir when that path exists: a `name` such as "case1" beside a
                # folder "case1" would become a path. Only image paths are paths here.
                item[key] = value
                continue
            # MONAI resolves only "image" (and "label"); registration pairs have other keys
            item[key] = os.path.normpath(value if os.path.isabs(value) else os.path.join(dataset_dir, value))
            if not os.path.exists(item[key]):
                where = "" if os.path.isabs(value) else f" (resolved against dataset_dir {dataset_dir})"
                raise BundleInputError(
                    f"datalist {datalist}, '{section}' item {index} ({raw.get('name', 'no name')}), key '{key}': "
                    f"{item[key]}: file not found{where}"
                )
    return items


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


# names that `monai.bundle run` / `run_workflow` / `create_workflow` take as their own arguments, not config keys
_RUNNER_ARGS = frozenset(
    {
        "run_id",
        "init_id",
        "final_id",
        "meta_file",
        "config_file",
        "logging_file",
        "tracking",
        "args_file",
        "workflow_type",
        "workflow_name",
        "properties_path",
    }
)


def _config_ids(config, prefix: str = "") -> list[str]:
    """Every id of a config (``a``, ``a#b``, ``a#0#c``), as ``monai.bundle.ConfigParser`` addresses them."""
    ids = []
    items = config.items() if isinstance(config, dict) else enumerate(config) if isinstance(config, list) else ()
    for key, value in items:
        cid = f"{prefix}{key}"
        ids.append(cid)
        ids.extend(_config_ids(value, cid + "#"))
    return ids


def _runner_overrides() -> tuple[dict, object, object] | None:
    """(override pairs, config_file, tracking) of the `monai.bundle` call that is running this config, read from
    the caller's frames: ``create_workflow``'s merged ``_args`` (command line and ``--args_file``) while the
    workflow initialises, or the arguments of ``run``/``run_workflow``. None when no bundle runner is on the stack
    (a config parsed by ``ConfigParser`` directly)."""
    import inspect

    from monai.bundle import scripts as runner

    codes = {
        runner.create_workflow.__code__: "create_workflow",
        runner.run.__code__: "run",
        runner.run_workflow.__code__: "run_workflow",
    }
    frame = inspect.currentframe()
    try:
        while frame is not None:
            kind = codes.get(frame.f_code)
            local = frame.f_locals
            if kind == "create_workflow" and isinstance(local.get("_args"), dict):
                return dict(local["_args"]), local.get("config_file"), local["_args"].get("tracking")
            if kind in ("run", "run_workflow"):
                pairs = dict(local.get("override") or local.get("kwargs") or {})
                if local.get("args_file"):
                    from monai.bundle import ConfigParser

                    pairs = {**ConfigParser.load_config_file(local["args_file"]), **pairs}
                return pairs, local.get("config_file", pairs.get("config_file")), local.get("tracking")
            frame = frame.f_back
    finally:
        del frame
    return None


def check_override_keys() -> list[str]:
    """Refuse command-line overrides that are not keys of the config (``--scael 2``), listing the close matches.

    ``python -m monai.bundle run --scael 2`` adds a new key ``scael`` that nothing reads, and the run goes on at the
    default scale. The configs call this first in ``initialize``: it reads the override keys of the running
    ``monai.bundle`` call (``run``, ``run_workflow`` or ``create_workflow``: command line and ``--args_file``) and
    compares them with the ids of the config files. A nested id (``--network_def#k 8``) is accepted when it
    exists, or when its parent does (a new argument of a component); ``_meta_#...`` ids and, with ``--tracking``,
    the tracking settings' keys are accepted too. Does nothing when the config is not run by ``monai.bundle``.

    Returns:
        the checked override keys (empty when there are none or no bundle runner is running).

    Raises:
        BundleInputError: one line naming every unknown key, the config files, and the close matches
            (``difflib.get_close_matches``), e.g. ``unknown config key --scael (did you mean --scale?) ...``.
    """
    import difflib

    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS
    from monai.utils import ensure_tuple

    found = _runner_overrides()
    if found is None:
        return []
    pairs, config_file, tracking = found
    keys = [str(k) for k in pairs if str(k) not in _RUNNER_ARGS]
    if not keys or not config_file:
        return keys
    files = [str(f) for f in ensure_tuple(config_file)]
    parser = ConfigParser(ConfigParser.load_config_files(files))
    known = set(_config_ids(parser.get()))
    if tracking:
        settings = (
            DEFAULT_EXP_MGMT_SETTINGS.get(tracking) if isinstance(tracking, str) else None
        ) or ConfigParser.load_config_files(tracking)
        known |= set(settings.get("configs", {}))
    unknown = []
    for key in keys:
        parent = key.rsplit("#", 1)[0] if "#" in key else None
        if key in known or key.startswith("_meta_") or (parent is not None and parent in known):
            continue
        unknown.append(key)
    if unknown:
        parts = []
        for key in unknown:
            # top-level typos are matched with top-level keys, nested ones with the ids at their depth
            candidates = sorted(k for k in known if k.count("#") == key.count("#"))
            close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join('--' + c for c in close)}?" if close else "no close match"
            parts.append(f"--{key} ({hint})")
        raise BundleInputError(
            f"unknown config key{'s' if len(unknown) > 1 else ''} {'; '.join(parts)}: not a key of "
            f"{', '.join(files)}. Check the spelling; the model card lists the keys."
        )
    return keys


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


def _load_file(path: str, where: str, file_kind: str, content_kind: str):
    """``torch.load`` of a weights or checkpoint file on the CPU (``weights_only=True``); one `BundleInputError`
    starting with `where` when the file is missing (``<file_kind> file not found``) or not loadable."""
    if not os.path.isfile(path):
        raise BundleInputError(f"{where}: {file_kind} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleInputError(f"{where}: not a loadable PyTorch {content_kind} ({str(e).splitlines()[0]})") from None


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
    loaded = _load_file(path, path, "weights", "state dict")
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


def check_resume_checkpoint(
    path: str,
    network: torch.nn.Module,
    entries: Sequence[str] = ("model", "optimizer", "lr_scheduler", "trainer"),
    optimizer: torch.optim.Optimizer | None = None,
    key: str = "resume_from",
    hint: str = "",
) -> str:
    """Check a training checkpoint given to resume training (``--resume_from``) before training starts.

    A resume checkpoint is what the train configs' ``CheckpointSaver`` writes (``checkpoint_final.pt`` or
    ``checkpoint_epoch=N.pt``): a dict with one entry per object the config's ``resume_loader`` restores. Without
    this check, a plain state dict (``models/model.pt``) or a checkpoint of another architecture fails deep inside
    ignite's ``Checkpoint.load_objects`` with a traceback that never names the file.

    Args:
        path: the checkpoint file.
        network: the configured network (may be DDP-wrapped); its state must fit the ``"model"`` entry
            (`checked_state`).
        entries: the entries the config's ``resume_loader`` loads (its ``load_dict`` keys).
        optimizer: the configured optimiser; when given, its parameter groups must have as many parameters as the
            checkpoint's ``"optimizer"`` entry.
        key: the config key that named `path`, for the message.
        hint: appended to a network mismatch message (e.g. which config keys decide the architecture).

    Returns:
        `path`.

    Raises:
        BundleInputError: one line naming ``--<key>`` and the file: not found, not loadable, network weights only
            (``use --pretrained_weights``), an entry missing, a network or optimiser that does not fit.
    """
    where = f"--{key} {path}"
    loaded = _load_file(path, where, "checkpoint", "checkpoint")
    if not isinstance(loaded, dict) or "model" not in loaded:
        if _plain_state(loaded) is not None:
            raise BundleInputError(
                f"{where}: holds network weights only (a plain state dict), not a training checkpoint with "
                f"{', '.join(entries)}; to start training from these weights use --pretrained_weights {path}"
            )
        raise BundleInputError(f"{where}: not a training checkpoint (found a {type(loaded).__name__})")
    missing = [e for e in entries if e not in loaded]
    if missing:
        raise BundleInputError(
            f"{where}: training checkpoint without {', '.join(repr(m) for m in missing)} (it has "
            f"{', '.join(repr(str(k)) for k in loaded)}); resume from a checkpoint this config's CheckpointSaver "
            f"wrote, or use --pretrained_weights {path} to start from its network weights"
        )
    try:
        checked_state(path, network, hint)
    except BundleInputError as e:
        raise BundleInputError(f"--{key} {e}") from None
    if optimizer is not None and isinstance(loaded.get("optimizer"), dict):
        saved = [len(g.get("params", [])) for g in loaded["optimizer"].get("param_groups", [])]
        configured = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
        if saved != configured:
            raise BundleInputError(
                f"{where}: the optimizer state holds parameter groups of {saved} tensors, the configured optimizer "
                f"has {configured}; the checkpoint comes from another training setup"
            )
    return path


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


def check_output_dir(path: str, key: str = "output_dir") -> str:
    """Check, before any compute, that files can be written in the folder `path`, without creating it (a run
    refused later leaves nothing behind): an existing folder must accept a file; otherwise the nearest existing
    parent must be a writable folder, so that the writers can create it.

    Args:
        path: the folder.
        key: the config key that set it (named in the message, e.g. ``output_dir`` or ``ckpt_dir``).

    Returns:
        `path`.

    Raises:
        BundleInputError: the folder cannot be written or created (names the key, the folder and the reason).
    """
    target = Path(os.path.abspath(path))
    parent = target
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    reason = None
    if not parent.is_dir():
        reason = f"{parent} is not a folder"
    else:
        try:
            probe = parent / f".write-test-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            reason = e.strerror or str(e)
    if reason:
        raise BundleInputError(f"{key} {path}: cannot be written ({reason}); pass --{key} <folder>")
    return path


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
    # a path string, or a MetaTensor's file name (none for an image made in memory)
    path = source if isinstance(source, (str, os.PathLike)) else getattr(source, "meta", {}).get("filename_or_obj")
    return Path(str(path)).name.split(".")[0] if isinstance(path, (str, os.PathLike)) and str(path) else "case"


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


def _file_stem(path) -> str:
    """``sub.01_T1w`` for ``.../sub.01_T1w.nii.gz``: the file name without its (double) extension."""
    name = Path(str(path)).name
    for suffix in (".gz", ".bz2"):
        name = name.removesuffix(suffix)
    return os.path.splitext(name)[0] or name


def _check_name(name: str, index: int) -> str:
    if not name or name in (".", "..") or any(c in name for c in "/\\"):
        raise BundleInputError(
            f"datalist item {index}: name {name!r} cannot name an output folder (empty, '.', '..' or with '/' or '\\')"
        )
    return name


def unique_case_names(items: list[dict], keys: Sequence[str] = ("image",)) -> list[dict]:
    """Give every datalist item its own output name (``item["name"]``), before anything is written.

    An item's ``name`` is kept when given. Otherwise the name is derived from its files: the stem of the file under
    ``keys[0]``; where items would share it, the stems under all `keys` joined by ``_to_`` (``<moving>_to_<fixed>``
    for ``keys=("moving_image", "fixed_image")``); where still shared, each stem prefixed by its file's parent folder
    names, one more at a time (``p1_t1`` and ``p2_t1`` for ``p1/t1.nii.gz`` and ``p2/t1.nii.gz``). Outputs are
    then written to ``output_dir/<name>/`` (`CaseNamed`), so no case overwrites another.

    Args:
        items: the datalist items (paths resolved); changed in place.
        keys: the file keys that name a case, the main one first.

    Returns:
        `items`, each with a ``name``.

    Raises:
        BundleInputError: two items have the same given name, a given name cannot name a folder (empty, or with
            ``/``), or two items cannot be told apart by their files (e.g. the same file twice): the message names
            both items and asks for distinct ``name`` entries.
    """
    taken: dict[str, int] = {}
    for index, item in enumerate(items):
        if item.get("name") not in (None, ""):
            name = item["name"] = _check_name(str(item["name"]), index)  # a string also after collation
            if name in taken:
                raise BundleInputError(
                    f"datalist items {taken[name]} and {index} have the same name {name!r}: each case needs its own "
                    f"output folder; make the names unique"
                )
            taken[name] = index
    candidates: dict[int, list[str]] = {}
    for index, item in enumerate(items):
        if item.get("name") in (None, ""):
            files = [item[k] for k in keys if item.get(k) is not None]
            stems = [_file_stem(f) for f in files] or [f"case{index}"]
            names = [stems[0], "_to_".join(stems)]
            parents = [[p for p in Path(str(f)).parent.parts if p not in ("/", "\\")] for f in files]
            for k in range(1, max((len(p) for p in parents), default=0) + 1):
                names.append("_to_".join("_".join([*p[-k:], s]) for p, s in zip(parents, stems)))
            candidates[index] = list(dict.fromkeys(names))
    level = dict.fromkeys(candidates, 0)
    while True:
        owners: dict[str, list[int]] = {}
        for index in candidates:
            owners.setdefault(candidates[index][level[index]], []).append(index)
        clashes = {n: i for n, i in owners.items() if len(i) > 1 or n in taken}
        if not clashes:
            break
        for name, indices in clashes.items():
            movable = [i for i in indices if level[i] + 1 < len(candidates[i])]
            if not movable:
                index = indices[0]
                other = taken.get(name, indices[-1])
                first = next((items[index][k] for k in keys if items[index].get(k) is not None), None)
                raise BundleInputError(
                    f"datalist items {min(index, other)} and {max(index, other)} cannot be told apart by their "
                    f"files ({first}): both would write to the output folder {candidates[index][0]!r}; give each "
                    f"item a distinct 'name'"
                )
            for index in movable:
                level[index] += 1
    for index, names in candidates.items():
        items[index]["name"] = names[level[index]]
    return items


class CaseNamed(MapTransform):
    """Name the outputs under `keys` after their case, just before ``SaveImaged``: MONAI's ``SaveImaged`` names a
    file after the ``filename_or_obj`` meta entry, so the outputs of a case go to ``output_dir/<name>/<name>_<postfix>``
    (the item's ``name``, unique per run: `unique_case_names`) instead of being named after the input file, which
    two cases can share. Without a name in the data (e.g. a MONAI Deploy application) the outputs keep their name.

    Args:
        keys: the key(s) of the output ``MetaTensor``\\ s; other values are left alone.
        name_key: the key of the case name in the data.
        allow_missing_keys: don't raise an exception when a key is missing (default true).
    """

    def __init__(self, keys, name_key: str = "name", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name_key = name_key

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: one case (decollated): the outputs under ``keys`` and its name under ``name_key``.

        Returns:
            a shallow copy of ``data`` whose MetaTensors under ``keys`` have ``meta["filename_or_obj"]`` set, in
            place, to ``<name>.nii.gz`` (the extension keeps a dot in the name from being taken for one).

        Raises:
            KeyError: a key is missing and ``allow_missing_keys`` is false.
        """
        d = dict(data)
        name = d.get(self.name_key)
        if isinstance(name, (list, tuple)) and len(name) == 1:
            name = name[0]
        if name in (None, ""):
            return d
        for key in self.key_iterator(d):
            if isinstance(d[key], MetaTensor):
                d[key].meta["filename_or_obj"] = f"{name}.nii.gz"
        return d


# --------------------------------------------------------------------------------------------------- orientation
ORIENTATION_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's axis codes: "RAS" = x right, y anterior, z up


def _affine(image) -> np.ndarray:
    """The current affine of a MetaTensor as float64 numpy ``[4, 4]``."""
    return np.asarray(torch.as_tensor(image.affine).as_subclass(torch.Tensor).double().cpu())


def original_affine(image) -> np.ndarray | None:
    """The affine of the file `image` was read from (``meta["original_affine"]``, set by MONAI's readers), else
    its current affine; None for a plain tensor."""
    meta = getattr(image, "meta", None)
    if meta is None:
        return None
    affine = meta.get("original_affine", meta.get("affine"))
    if affine is None:
        return None
    affine = np.asarray(torch.as_tensor(affine).as_subclass(torch.Tensor).double().cpu())
    return affine[0] if affine.ndim == 3 else affine


class RestoreOrientationd(MapTransform):
    """Give outputs computed on the network's grid (reoriented by MONAI ``Orientationd``, e.g. to RAS) the array
    order of an input file again: axes permuted and flipped as MONAI ``Orientation`` does, so that the saved file
    has the input's orientation (the same affine and array order as the input when the grids match). The world
    content does not change.

    A DDF in voxels (``ddf_keys``: 3 channels, channel ``i`` = displacement along array axis ``i``) also has its
    components permuted the same way and negated along flipped axes, so it stays the displacement in the new array's
    voxel axes: MONAI ``Warp`` of the reoriented moving image with the reoriented DDF gives the reoriented warped
    image.

    Args:
        keys: the key(s) of the outputs, MetaTensors ``[C, *spatial]`` with their current affine.
        ref_key: the input whose file orientation is restored (`original_affine`).
        ddf_keys: the keys among `keys` that are DDFs in voxels ``[3, X, Y, Z]``.
        allow_missing_keys: don't raise an exception when a key is missing (default true).
    """

    def __init__(self, keys, ref_key: str, ddf_keys: Sequence[str] = (), allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.ddf_keys = set([ddf_keys] if isinstance(ddf_keys, str) else ddf_keys)

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: one case (decollated): the outputs under ``keys`` and the input under ``ref_key``.

        Returns:
            a shallow copy of ``data`` with each output reoriented to the orientation of ``ref_key``'s file (unchanged
            when it already has it, when it is a plain tensor without an affine, or when ``ref_key`` is absent or has
            no affine).

        Raises:
            KeyError: a key is missing and ``allow_missing_keys`` is false.
            ValueError: a DDF key does not hold one channel per spatial axis.
        """
        d = dict(data)
        target = original_affine(d.get(self.ref_key))
        if target is None:
            return d
        dst = nib.io_orientation(target)
        axcodes = "".join(nib.orientations.ornt2axcodes(dst, ORIENTATION_LABELS))
        for key in self.key_iterator(d):
            image = d[key]
            if not isinstance(image, MetaTensor):  # no affine: nothing says which grid it is on
                continue
            ornt = nib.orientations.ornt_transform(nib.io_orientation(_affine(image)), dst)
            if np.array_equal(ornt, [[i, 1] for i in range(len(ornt))]):
                continue
            out = Orientation(axcodes=axcodes, labels=ORIENTATION_LABELS)(image)
            if key in self.ddf_keys:
                if out.shape[0] != len(ornt):
                    raise ValueError(f"{key}: a DDF needs {len(ornt)} channels, got shape {tuple(out.shape)}")
                components = [None] * len(ornt)
                for axis, (new_axis, flip) in enumerate(ornt):
                    components[int(new_axis)] = out[axis] * float(flip)
                plain = torch.stack([torch.as_tensor(c).as_subclass(torch.Tensor) for c in components])
                out = MetaTensor(plain, meta=out.meta, applied_operations=out.applied_operations)
            d[key] = out
        return d


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
_WRITTEN: list[str] = []  # files written atomically since OutputPathsHandler last printed


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
    _WRITTEN.append(str(final.resolve()))
    return final


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


_WRITE_POOL: list[ThreadPoolExecutor] = []  # created on first use, one thread per intra-op thread (at most 4)
_PENDING: list[Future] = []


def write_in_background(write: Callable, *args, **kwargs) -> Future:
    """Run ``write(*args, **kwargs)`` in a pool of writer threads (gzip compression releases the GIL, so the
    outputs of a case are compressed side by side); `wait_for_writes` waits for them and raises the first error."""
    if not _WRITE_POOL:
        _WRITE_POOL.append(ThreadPoolExecutor(max(1, min(4, torch.get_num_threads())), "bundle-writer"))
    future = _WRITE_POOL[0].submit(write, *args, **kwargs)
    _PENDING.append(future)
    return future


def wait_for_writes() -> None:
    """Wait for every `write_in_background` write; re-raise the first error (after all have finished, so no
    temporary file is left behind)."""
    pending, _PENDING[:] = list(_PENDING), []
    errors = [f.exception() for f in pending]
    for error in errors:
        if error is not None:
            raise error


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
        _WRITTEN.append(str(final.resolve()))
        if verbose:
            print(f"wrote {final}")


class BackgroundNibabelWriter(AtomicNibabelWriter):
    """`AtomicNibabelWriter` that compresses and writes in a writer thread (`write_in_background`), so that the
    files of a case are written side by side. `OutputPathsHandler` waits for them at the end of each iteration
    (before it prints the paths), and raises a write error there; outside an evaluator call `wait_for_writes`.

    Use it as ``SaveImaged(..., writer="scripts.common.BackgroundNibabelWriter")``.
    """

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        """Queue the atomic write of the image set by ``set_data_array``/``set_metadata`` to `filename`."""
        write_in_background(super().write, filename, verbose, **obj_kwargs)


class OutputPathsHandler:
    """Print where the outputs of every case went, and how long the case took.

    After each iteration, on stdout, one line per case, ``<case>: <file>, <file>, ...`` (absolute paths, in the
    order they were written), then ``<case>: <seconds> s`` (wall time of the iteration from its start: the network,
    the postprocessing and the writing; not the loading, which MONAI does before the iteration starts), followed by
    `` (network <seconds> s)`` when the evaluator's inferer records its last call (``last_seconds``, as
    ``scripts.fast_inference.InferenceModeInferer`` does).

    It reports the files that :class:`AtomicNibabelWriter` (every ``SaveImaged`` of the configs uses it) and
    `atomic_write_bytes` wrote during the iteration, grouped by their folder: the configs write
    ``output_dir/<case>/<case>_<postfix>.nii.gz`` (``separate_folder``), so the folder is the case name. Add it to an
    evaluator's ``val_handlers``; MONAI attaches it after the postprocessing, and it first waits for the writes that
    :class:`BackgroundNibabelWriter` queued (raising a write error there), so the files of the iteration exist when
    it prints.
    """

    def __init__(self) -> None:
        self._started = time.perf_counter()

    def attach(self, engine: Engine) -> None:
        """Attach to `engine`: forget earlier writes when an iteration starts, print when it completes."""
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_STARTED, self._start)
        engine.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: self.print_cases(
                getattr(getattr(e, "inferer", None), "last_seconds", None), getattr(e.state, "io_seconds", None)
            ),
        )

    def _start(self, _engine=None) -> None:
        _WRITTEN.clear()
        self._started = time.perf_counter()

    def print_cases(
        self, network_seconds: float | None = None, io_seconds: float | None = None
    ) -> dict[str, list[str]]:
        """Print the files written since the last call, one line per case folder, and the time; forget them.

        Args:
            network_seconds: the network's share of the time (the inferer's ``last_seconds``), printed as
                ``<case>: <seconds> s (network <seconds> s)`` when given.
            io_seconds: the instance optimisation's share (the iteration's ``engine.state.io_seconds``), printed as
                ``(network <seconds> s, IO <seconds> s)`` when given.

        Returns:
            ``{case: [file, ...]}`` as printed.
        """
        wait_for_writes()
        seconds = time.perf_counter() - self._started
        cases: dict[str, list[str]] = {}
        for path in _WRITTEN:
            cases.setdefault(Path(path).parent.name, []).append(path)
        _WRITTEN.clear()
        for case, files in cases.items():
            print(f"{case}: {', '.join(files)}", flush=True)
            parts = [f"network {network_seconds:.2f} s"] if network_seconds is not None else []
            parts += [f"IO {io_seconds:.2f} s"] if io_seconds is not None else []
            network = f" ({', '.join(parts)})" if parts else ""
            print(f"{case}: {seconds:.2f} s{network}", flush=True)
        return cases


# --------------------------------------------------------------------------------------------- the process
def use_bundle_scripts(bundle_root: str) -> str:
    """Make ``scripts`` mean this bundle's ``scripts`` package in this Python process.

    Every model-zoo bundle calls its package ``scripts``. When several bundles run in one interpreter (MONAI Deploy,
    MONAI Label, a notebook), the first bundle's package stays cached in ``sys.modules`` and the next bundle's
    configs would import the wrong code (e.g. ``ModuleNotFoundError: scripts.rem_loader``). This drops the cached
    ``scripts`` modules of other folders and puts `bundle_root` first on ``sys.path``. The configs call it first in
    ``initialize`` (any bundle's copy of this function does the same, since the copies are identical).

    Returns:
        the absolute bundle root.
    """
    root = os.path.abspath(bundle_root)
    for name in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        origin = getattr(sys.modules[name], "__file__", None) or ""
        if not os.path.abspath(origin).startswith(root + os.sep):
            del sys.modules[name]
    while root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    return root


def _bundle_input_error(exc: BaseException | None) -> BundleInputError | None:
    """The first `BundleInputError` in the cause/context chain of `exc` (MONAI wraps errors of components)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BundleInputError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook) -> None:
    """Print a bad input as one line at the end of the output (no traceback), anything else as usual.

    ``BUNDLE_TRACEBACK=1`` in the environment prints the full traceback as well.
    """
    error = _bundle_input_error(exc)
    if error is None:
        _previous(exc_type, exc, tb)
        return
    if str2bool(os.environ.get("BUNDLE_TRACEBACK", "0"), default=False, raise_exc=False):
        _previous(exc_type, exc, tb)
    sys.stderr.write(f"error: {error}\n")
    sys.stderr.flush()


if getattr(sys.excepthook, "__name__", "") != "_excepthook":
    sys.excepthook = _excepthook


# ------------------------------------------------------------------------------------------------- training
def attach_time_limit(trainer, seconds: float):
    """
    Stop training after ``seconds`` of wall-clock time (ignite's ``TimeLimit``, checked after every iteration);
    the engine still completes, so the final checkpoint is saved. Used for equal-budget comparisons.

    Args:
        trainer: the ignite training engine.
        seconds: the budget in seconds (> 0), counted from this call.

    Returns:
        the attached ``ignite.handlers.TimeLimit``.

    Raises:
        BundleInputError: for a budget that is not a positive number.
    """
    from ignite.engine import Events
    from ignite.handlers import TimeLimit

    try:
        budget = float(seconds)
    except (TypeError, ValueError):
        budget = float("nan")
    if not budget > 0:
        raise BundleInputError(f"time_limit_s must be a positive number of seconds, got {seconds!r}")
    handler = TimeLimit(limit_sec=int(np.ceil(budget)))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, handler)
    return handler


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
