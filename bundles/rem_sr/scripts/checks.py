"""Early, explicit checks of the volumes a user gives REM, so that bad data fails with one clear message
naming the file and the problem, before any output is written. The checks every bundle shares (files,
datalists, weights, flags) live in `common` and are re-exported here for the configs."""

from __future__ import annotations

from collections.abc import Sequence

from .common import (  # noqa: F401  (re-exported: configs and tests use scripts.checks.*)
    BundleInputError,
    check_volume_file,
    check_weights,
    checked_state,
    config_flag,
    load_checked_weights,
    load_datalist,
    unique_case_names,
)

DATA_HINT = "Run `python tools/fetch_sample_data.py` for the sample data."


def check_items(
    items: list[dict],
    keys: Sequence[str],
    min_size: int | Sequence[int] = 1,
    optional_keys: Sequence[str] = (),
    any_of_keys: Sequence[str] = (),
) -> list[dict]:
    """Check every file of every datalist item; returns the items unchanged so configs can chain it.

    `keys` must all be present, an item must hold at least one of `any_of_keys` (e.g. a real ``image`` or a
    ``labels`` map); both are checked with `min_size`, `optional_keys` with any size."""
    for item in items:
        if any_of_keys and not any(k in item for k in any_of_keys):
            raise BundleInputError(f"datalist item {item} has none of the entries {list(any_of_keys)}")
        for key in [*keys, *(k for k in any_of_keys if k in item)]:
            if key not in item:
                raise BundleInputError(f"datalist item {item} has no '{key}' entry")
            check_volume_file(item[key], min_size)
        for key in optional_keys:
            if key in item:
                check_volume_file(item[key], 1)
    return items


def checked_datalist(
    datalist: str,
    dataset_dir: str,
    section: str,
    keys: Sequence[str],
    min_size: int | Sequence[int] = 1,
    optional_keys: Sequence[str] = (),
    unique_names: bool = False,
    image: str | None = None,
    any_of_keys: Sequence[str] = (),
) -> list[dict]:
    """`load_datalist` + `check_items`, as one callable for configs (``_target_``); or one file (`image`).

    With `unique_names` every item also gets its own output name (``item["name"]``: the given one, else the stem of
    its first key's file, made unique with parent folder names: ``common.unique_case_names``), so that no case's
    outputs overwrite another's.

    Args:
        datalist: the datalist JSON file (not read when `image` is given).
        dataset_dir: the folder relative paths of the datalist are resolved against.
        section: the list to read (``training``, ``validation``, ``test``).
        keys: the image keys every item must have, checked with `min_size`.
        min_size: smallest size per spatial axis of the `keys` volumes.
        optional_keys: keys checked when present (any size), e.g. ``reference``.
        any_of_keys: keys of which every item holds at least one, checked with `min_size` (rem_sr's training
            items: a real ``image`` or a ``labels`` map).
        unique_names: give each item its own output name.
        image: one volume to process instead of the datalist (``--image path``): a single item
            ``{keys[0]: image}``, checked the same way and named after the file's stem.

    Raises:
        BundleInputError: as `load_datalist` and `check_items`; with `unique_names`, as ``unique_case_names``.
    """
    if image:
        items = check_items([{list(keys)[0]: str(image)}], list(keys)[:1], min_size)
    else:
        items = check_items(
            load_datalist(datalist, dataset_dir, section, DATA_HINT), keys, min_size, optional_keys, any_of_keys
        )
    return unique_case_names(items, list(keys)[:1]) if unique_names else items
