"""Early, explicit checks of the registration pairs a user gives the bundle: one clear message naming the
file and the problem, before anything is written. The checks every bundle shares live in `common`; the pair
checks (`check_pairs`), shared with the other registration bundle, in `pairs`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .common import (  # noqa: F401  (re-exported: configs and tests use scripts.checks.*)
    BundleInputError,
    check_weights,
    checked_state,
    config_flag,
    load_checked_weights,
    load_datalist,
    volume_header,
)
from .pairs import check_pairs, file_pair

DATA_HINT = "Run `python tools/make_abdomen_phantoms.py` for the sample phantoms."

DIRECTIONS = ("ct2mri", "mri2ct")


def check_direction(direction: str) -> str:
    """``ct2mri`` (moving CT, fixed MR) or ``mri2ct`` (moving MR, fixed CT)."""
    if str(direction) not in DIRECTIONS:
        raise BundleInputError(f"direction must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    return str(direction)


def load_direction_datalist(datalist: str, dataset_dir: str, section: str, direction: str | None = None) -> list[dict]:
    """`load_datalist` of the `section` list, paths resolved against `dataset_dir`. A datalist that declares
    its own ``direction`` (both data tools write one) must agree with the configured direction, since the
    direction decides which image is normalised as CT and which as MR.

    Raises:
        BundleInputError: as `load_datalist`, or the declared direction differs.
    """
    items = load_datalist(datalist, dataset_dir, section, DATA_HINT)
    if direction is not None:
        direction = check_direction(direction)
        declared = json.loads(Path(datalist).read_text()).get("direction")
        if declared is not None and declared != direction:
            raise BundleInputError(
                f"datalist {datalist} is for direction '{declared}' but the bundle runs "
                f"'{direction}'; pass --direction {declared} or the matching datalist"
            )
    return items


def checked_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    require_labels: bool = False,
    direction: str | None = None,
    unique_names: bool = False,
) -> list[dict]:
    """`load_direction_datalist` + `check_pairs` (``scripts.pairs``), as one callable for configs (``_target_``).

    Args:
        datalist: the datalist JSON file.
        dataset_dir: the folder relative paths are resolved against.
        section: the list to read (``training``, ``validation``, ``test``).
        min_size: smallest size per spatial axis of the images.
        require_labels: both labels must be given (Dice).
        direction: the configured direction, checked against the datalist's; None: not checked.
        unique_names: give each pair its own output name (inference and evaluation).

    Returns:
        the checked items.

    Raises:
        BundleInputError: as `load_direction_datalist` and `check_pairs`.
    """
    items = load_direction_datalist(datalist, dataset_dir, section, direction)
    return check_pairs(items, min_size, require_labels, unique_names=unique_names)


def inference_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    direction: str | None = None,
    moving_image: str | None = None,
    fixed_image: str | None = None,
    moving_label: str | None = None,
) -> list[dict]:
    """The pairs to register: one pair given by file (``--moving_image a --fixed_image b [--moving_label c]``),
    or else the `section` list of the datalist; checked (`check_pairs`), each with its own output name (``name``).

    Raises:
        BundleInputError: only one of the two images given, or as `checked_pairs`.
    """
    if (moving_image or fixed_image) and direction is not None:
        check_direction(direction)
    pair = file_pair(moving_image, fixed_image, moving_label, min_size)
    if pair is not None:
        return pair
    return checked_pairs(datalist, dataset_dir, section, min_size, direction=direction, unique_names=True)


# ------------------------------------------------------------------------------------------ weights per direction
DIRECTION_LABELS = {"ct2mri": "CT->MRI", "mri2ct": "MRI->CT"}


def weights_name(direction: str, variant: str = "none") -> str:
    """The file name of the weights of one direction and F3D variant, as ``train.json`` saves them and
    ``inference.json``/``evaluate.json`` look for them by default.

    Args:
        direction: ``ct2mri`` or ``mri2ct``.
        variant: the F3D variant (``none``, ``all``, ``encoder``, ...).

    Returns:
        ``model.pt`` (CT->MRI, variant none: the shipped weights), ``model_all.pt``, ``model_mri2ct.pt``,
        ``model_mri2ct_all.pt``, ...

    Raises:
        BundleInputError: an unknown direction.
    """
    direction = check_direction(direction)
    parts = (
        ["model"] + ([direction] if direction != "ct2mri" else []) + ([str(variant)] if str(variant) != "none" else [])
    )
    return "_".join(parts) + ".pt"


def default_weights(models_dir: str, direction: str, variant: str = "none") -> str:
    """``<models_dir>/<weights_name(direction, variant)>``: the default ``ckpt_path`` of a direction and variant."""
    return str(Path(models_dir) / weights_name(direction, variant))


def check_direction_weights(
    path: str,
    network,
    direction: str,
    variant: str = "none",
    models_dir: str | None = None,
    key: str = "ckpt_path",
    hint: str = "",
    method: str | None = None,
) -> str:
    """`check_weights` that says what to pass when the weights of the chosen direction or variant are missing.

    Weights are shipped for some directions and variants only (``models/model*.pt``; ``model.pt`` is CT->MRI,
    variant ``none``). Without this check, ``--direction mri2ct`` once ran the CT->MRI weights without a word; the
    default weights file is per direction and variant (`weights_name`), and a missing one is an error naming the
    file, the training command that writes it and the key to pass instead.

    Args:
        path: the weights file (``ckpt_path``, or ``method_weights[method]`` in evaluate.json).
        network: the configured network.
        direction: ``ct2mri`` or ``mri2ct``.
        variant: the F3D variant of the configured network.
        models_dir: the folder of the default weights; when `path` is the default file of `direction` and `variant`
            there, the message names the training command that writes it.
        key: the config key that sets `path` (``ckpt_path`` in inference.json).
        hint: appended to a network mismatch message.
        method: evaluate.json's ``method``: the key to pass is then ``method_weights#<method>`` (a config cannot
            spell ``#`` in a string: MONAI reads it as its id separator).

    Returns:
        `path`.

    Raises:
        BundleInputError: `path` is missing (``<path>: weights file not found: no MRI->CT weights ...``), not
            loadable, or does not fit `network` (`check_weights`).
    """
    direction = check_direction(direction)
    key = f"method_weights#{method}" if method is not None else key
    if not Path(str(path)).is_file():
        label = DIRECTION_LABELS[direction]
        default = default_weights(models_dir, direction, variant) if models_dir is not None else None
        if default is not None and Path(str(path)).resolve() == Path(default).resolve():
            shipped = sorted(p.name for p in Path(models_dir).glob("model*.pt"))
            raise BundleInputError(
                f"{path}: weights file not found: no {label} weights of variant '{variant}' are shipped "
                f"({', '.join(shipped) or 'none'} in {models_dir}; model.pt is CT->MRI, variant none). Train them with "
                f"`python -m monai.bundle run --config_file configs/train.json --direction {direction} "
                f"--variant {variant}` (it saves {weights_name(direction, variant)}), or pass --{key} <weights file>"
            )
        raise BundleInputError(f"{path}: weights file not found (--{key}, direction {direction}, variant '{variant}')")
    return check_weights(str(path), network, hint)
