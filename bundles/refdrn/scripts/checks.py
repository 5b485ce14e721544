"""Early, explicit checks of the registration pairs a user gives the bundle: one clear message naming the
file and the problem, before anything is written. The checks every bundle shares live in `common`; the pair
checks (`check_pairs`), shared with the other registration bundle, in `pairs`."""

from __future__ import annotations

from collections.abc import Sequence

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

DATA_HINT = "Run `python tools/make_brain_pairs.py` for the sample pairs."


def checked_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    require_labels: bool = False,
    num_classes: int | None = None,
    unique_names: bool = False,
) -> list[dict]:
    """`load_datalist` + `check_pairs` (``scripts.pairs``), as one callable for configs (``_target_``).

    Args:
        datalist: the datalist JSON file.
        dataset_dir: the folder relative paths are resolved against.
        section: the list to read (``training``, ``validation``, ``test``).
        min_size: smallest size per spatial axis of the images.
        require_labels: both labels must be given (Dice).
        num_classes: label ids must be below this (evaluate.json's metrics); None: no limit.
        unique_names: give each pair its own output name (inference and evaluation).

    Returns:
        the checked items.

    Raises:
        BundleInputError: as `load_datalist` and `check_pairs`.
    """
    return check_pairs(
        load_datalist(datalist, dataset_dir, section, DATA_HINT), min_size, require_labels, num_classes, unique_names
    )


def inference_pairs(
    datalist: str,
    dataset_dir: str,
    section: str,
    min_size: int | Sequence[int] = 1,
    moving_image: str | None = None,
    fixed_image: str | None = None,
    moving_label: str | None = None,
) -> list[dict]:
    """The pairs to register: one pair given by file (``--moving_image a --fixed_image b [--moving_label c]``),
    or else the `section` list of the datalist; checked (`check_pairs`), each with its own output name (``name``).

    Args:
        datalist: the datalist JSON file (not read when the files are given).
        dataset_dir: the folder relative paths of the datalist are resolved against.
        section: the list to read (``test`` for inference).
        min_size: smallest size per spatial axis of the images.
        moving_image: the moving volume of the single pair, or None.
        fixed_image: the fixed volume of the single pair, or None.
        moving_label: optional label map of the moving volume (warped with the DDF).

    Returns:
        the checked items, each with ``name``.

    Raises:
        BundleInputError: only one of the two images given, or as `checked_pairs`.
    """
    pair = file_pair(moving_image, fixed_image, moving_label, min_size)
    return pair if pair is not None else checked_pairs(datalist, dataset_dir, section, min_size, unique_names=True)
