"""Registration pairs, shared by the refdrn and f3rnet_ct_mri bundles: the up-front checks of a user's pairs and
the label handling around the network.

This file is a deliberate, identical copy in ``bundles/{refdrn,f3rnet_ct_mri}/scripts/pairs.py``, so that each
bundle keeps working when it is copied out on its own. Edit the copy in ``refdrn`` and run
``python tools/sync_common.py``; ``tests/test_common_copies.py`` fails while the copies differ.

- `check_pairs`: both images readable 3D volumes on one world grid (in any storage orientation: the pipelines
  reorient to RAS with MONAI ``Orientationd``), labels holding integer ids >= 0 that overlap their image, and
  (optionally) one output name per pair; one `BundleInputError` before anything is written.
- `LabelsToImageGridd`: each label resampled onto its image's grid by world coordinates (nearest neighbour)
  whenever its shape or affine differs.
- `WarpMovingd`: the moving image and label warped with the network's DDF (MONAI ``Warp``); the label is first
  brought onto the DDF's grid, and saved in a dtype that holds every id (`label_dtype`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.transforms import MapTransform, ResampleToMatch

from .common import BundleInputError, unique_case_names, volume_header

__all__ = ["LabelsToImageGridd", "WarpMovingd", "check_pairs", "file_pair", "label_dtype", "ras_grid"]

# the largest label id a saved label map holds (int32, NIfTI's widest common integer type)
MAX_LABEL_ID = int(np.iinfo(np.int32).max)
# grids whose affines differ by less than this (mm) are the same grid
GRID_ATOL = 1e-3


def _affine_text(affine: np.ndarray) -> str:
    """The first three rows of an affine on one line, e.g. ``[[1, 0, 0, -80], [0, 1, 0, -120], [0, 0, 1, -83]]``."""
    rows = np.asarray(affine, dtype=float)[:3]
    return "[" + ", ".join("[" + ", ".join(f"{v + 0.0:.4g}" for v in row) + "]" for row in rows) + "]"  # no -0


def _grid_text(img: nib.spatialimages.SpatialImage) -> str:
    """``shape (X, Y, Z), affine [[...]] (LPS)``: a volume's grid as stored, for messages."""
    codes = "".join(nib.aff2axcodes(img.affine))
    return f"shape {tuple(int(s) for s in img.shape[:3])}, affine {_affine_text(img.affine)} ({codes})"


def ras_grid(img: nib.spatialimages.SpatialImage) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid of `img` after reorientation to RAS (what MONAI ``Orientationd(axcodes="RAS")`` gives), from the
    header alone.

    Args:
        img: a nibabel image (3D, or with trailing singleton axes).

    Returns:
        the spatial shape ``(X, Y, Z)`` in voxels and the ``[4, 4]`` affine (mm) of the reoriented array.
    """
    shape = tuple(int(s) for s in img.shape[:3])
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt("RAS"))
    new_shape = [0, 0, 0]
    for axis, (new_axis, _) in enumerate(ornt):
        new_shape[int(new_axis)] = shape[axis]
    return tuple(new_shape), img.affine @ nib.orientations.inv_ornt_aff(ornt, shape)


def _overlaps(label: nib.spatialimages.SpatialImage, image: nib.spatialimages.SpatialImage) -> bool:
    """Whether the label's field of view (its voxel box, corners at the voxel edges) meets the image's."""
    corners = np.array(np.meshgrid(*[(-0.5, s - 0.5) for s in label.shape[:3]], indexing="ij")).reshape(3, -1)
    to_image = np.linalg.inv(image.affine) @ label.affine
    inside = to_image[:3, :3] @ corners + to_image[:3, 3:]
    lo, hi = inside.min(axis=1), inside.max(axis=1)
    return bool(np.all(lo < np.asarray(image.shape[:3]) - 0.5) and np.all(hi > -0.5))


def _check_label(path: str, key: str, image_path: str, image, num_classes: int | None) -> None:
    """One label file: readable 3D, integer ids >= 0 (at most `MAX_LABEL_ID`, below `num_classes` when set), and a
    field of view that meets its image's."""
    label = volume_header(path, 1)
    data = np.asanyarray(label.dataobj)
    bad = (data < 0) if np.issubdtype(data.dtype, np.integer) else (data < 0) | (data != np.round(data))
    if bad.any():
        example = data[bad].flat[0]
        raise BundleInputError(
            f"{path} ('{key}'): a label map must hold integer ids >= 0, found {example.item()!r} "
            f"({int(bad.sum())} voxels)"
        )
    top = int(data.max()) if data.size else 0
    if top > MAX_LABEL_ID:
        raise BundleInputError(f"{path} ('{key}'): label id {top} is larger than {MAX_LABEL_ID}, the largest (int32)")
    if num_classes is not None and top >= int(num_classes):
        raise BundleInputError(
            f"{path} ('{key}'): label id {top} >= num_classes {int(num_classes)}; pass --num_classes {top + 1} "
            f"(the metrics count the ids 0 .. num_classes - 1)"
        )
    if not _overlaps(label, image):
        raise BundleInputError(
            f"{path} ('{key}'): the label ({_grid_text(label)}) does not overlap its image {image_path} "
            f"({_grid_text(image)}); check that the label belongs to this image"
        )


def check_pairs(
    items: list[dict],
    min_size: int | Sequence[int] = 1,
    require_labels: bool = False,
    num_classes: int | None = None,
    unique_names: bool = False,
) -> list[dict]:
    """Check every registration pair of a datalist before anything is computed or written.

    - ``fixed_image`` and ``moving_image``: readable single-channel 3D volumes, at least `min_size` voxels per axis,
      finite, on one world grid: the same shape and affine after reorientation to RAS (`ras_grid`), so a pair stored
      in different orientations (one LPS, one RAS) passes. The networks predict the DDF on that grid from the stacked
      pair, so a moving image on another grid must be resampled first (after affine pre-alignment).
    - ``fixed_label`` / ``moving_label`` (optional unless `require_labels`): integer ids >= 0 (float files with
      integer values are fine), at most `MAX_LABEL_ID`, below `num_classes` when given, and a field of view that
      overlaps the label's image. A label on another grid than its image is fine: the pipelines resample it by world
      coordinates, nearest neighbour (`LabelsToImageGridd`, `WarpMovingd`).
    - `unique_names`: every pair gets its own output name (``item["name"]``: the given one, else
      ``<moving stem>``, ``<moving stem>_to_<fixed stem>`` where moving images repeat, ...: `unique_case_names`).

    Args:
        items: datalist items with ``fixed_image``, ``moving_image`` and optional label paths (resolved).
        min_size: smallest size per spatial axis of the images (an int, or one per axis).
        require_labels: both labels must be given (evaluation and validation: Dice).
        num_classes: label ids must be below this (the metrics' ``num_classes``); None: no limit.
        unique_names: give each item its unique output name (inference and evaluation outputs).

    Returns:
        `items` (with ``name`` set when `unique_names`).

    Raises:
        BundleInputError: a missing key, a file that is missing, unreadable, not 3D, too small or not finite; images on
            different world grids (both shapes and affines in the message); a label with non-integer or negative
            values, an id too large, or no overlap with its image; two items with the same output name.
    """
    for item in items:
        for key in ("fixed_image", "moving_image"):
            if key not in item:
                raise BundleInputError(f"datalist item {item} has no '{key}' entry")
        fixed = volume_header(item["fixed_image"], min_size)
        moving = volume_header(item["moving_image"], min_size)
        (fixed_shape, fixed_affine), (moving_shape, moving_affine) = ras_grid(fixed), ras_grid(moving)
        if fixed_shape != moving_shape or not np.allclose(fixed_affine, moving_affine, atol=GRID_ATOL):
            raise BundleInputError(
                f"{item['moving_image']}: the moving image's grid ({_grid_text(moving)}) does not match the fixed "
                f"image {item['fixed_image']} ({_grid_text(fixed)}), also after reorienting both to RAS; resample "
                f"the pair onto one grid (after affine pre-alignment) first"
            )
        for key, image_key, image in (("fixed_label", "fixed_image", fixed), ("moving_label", "moving_image", moving)):
            if key in item:
                _check_label(item[key], key, item[image_key], image, num_classes)
            elif require_labels:
                raise BundleInputError(f"datalist item {item.get('name', item)} has no '{key}' (needed for Dice)")
    if unique_names:
        unique_case_names(items, ("moving_image", "fixed_image"))
    return items


def file_pair(
    moving_image: str | None,
    fixed_image: str | None,
    moving_label: str | None = None,
    min_size: int | Sequence[int] = 1,
) -> list[dict] | None:
    """The one pair given by file on the command line (``--moving_image a --fixed_image b [--moving_label c]``),
    checked like a datalist pair (`check_pairs`, with its own output name), or None when no file is given.

    Raises:
        BundleInputError: only one of the two images given, or as `check_pairs`.
    """
    if not (moving_image or fixed_image):
        return None
    if not (moving_image and fixed_image):
        raise BundleInputError("give both --moving_image and --fixed_image (or neither, to use the datalist)")
    item = {"moving_image": str(moving_image), "fixed_image": str(fixed_image)}
    if moving_label:
        item["moving_label"] = str(moving_label)
    return check_pairs([item], min_size, unique_names=True)


def label_dtype(max_id: int) -> torch.dtype:
    """The smallest NIfTI-friendly integer dtype that holds the ids ``0 .. max_id``.

    Args:
        max_id: the largest label id (>= 0; `check_pairs` refuses ids above `MAX_LABEL_ID`).

    Returns:
        ``torch.uint8`` up to 255, ``torch.int16`` up to 32767, else ``torch.int32``.
    """
    if max_id <= 255:
        return torch.uint8
    return torch.int16 if max_id <= 32767 else torch.int32


def _plain(x) -> torch.Tensor:
    return torch.as_tensor(x).as_subclass(torch.Tensor)


def _same_grid(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same spatial shape and (for MetaTensors) affines within `GRID_ATOL` mm."""
    if tuple(a.shape[1:]) != tuple(b.shape[1:]):
        return False
    if not (isinstance(a, MetaTensor) and isinstance(b, MetaTensor)):
        return True
    return bool(torch.allclose(_plain(a.affine).double().cpu(), _plain(b.affine).double().cpu(), atol=GRID_ATOL))


def _to_grid(label: torch.Tensor, ref: torch.Tensor, what: str) -> torch.Tensor:
    """`label` resampled onto the grid of `ref` by world coordinates (nearest neighbour, zero outside; MONAI
    ``ResampleToMatch``), ids and dtype kept; unchanged when it is already on that grid."""
    if _same_grid(label, ref):
        return label
    if not (isinstance(label, MetaTensor) and isinstance(ref, MetaTensor)):
        raise ValueError(
            f"{what}: spatial shape {tuple(label.shape[1:])} differs from {tuple(ref.shape[1:])} and there is no "
            f"affine to resample it with"
        )
    dtype = label.dtype
    out = ResampleToMatch(mode="nearest", padding_mode="zeros", dtype=torch.float64)(label, img_dst=ref)
    return out.round().to(dtype) if not dtype.is_floating_point else out


class LabelsToImageGridd(MapTransform):
    """
    Bring each label map onto its image's grid by world coordinates, nearest neighbour, zero outside the label's
    field of view (MONAI ``ResampleToMatch``), whenever the label's shape or affine differs from the image's (e.g.
    a label stored mirrored, or at another resolution). Ids and dtype are kept.

    Args:
        keys: the label keys, ``[1, x, y, z]`` MetaTensors.
        image_keys: the image of each label, in the same order (``[C, X, Y, Z]`` MetaTensors).
        allow_missing_keys: don't raise an exception when a key is missing (default true: labels are optional).

    Raises:
        ValueError: (at construction) `keys` and `image_keys` differ in length.
    """

    def __init__(self, keys: KeysCollection, image_keys: Sequence[str], allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        if len(self.image_keys) != len(self.keys):
            raise ValueError(f"one image key per label key, got {self.keys} and {self.image_keys}")

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the labels under ``keys`` and their images under ``image_keys``.

        Returns:
            a shallow copy of ``data`` with each present label on its image's grid (shape and affine).

        Raises:
            KeyError: a label's image is missing, or a label is missing and ``allow_missing_keys`` is false.
            ValueError: a label and its image differ in shape and are not MetaTensors (no affine).
        """
        d = dict(data)
        for key, image_key in self.key_iterator(d, self.image_keys):
            d[key] = _to_grid(d[key], d[image_key], key)
        return d


class WarpMovingd(MapTransform):
    """
    Warp `image_key` (bilinear, border padding) and, when present, `label_key` (nearest neighbour, zero padding) with
    the DDF in `ddf_key` (voxels, MONAI ``Warp`` convention), writing ``warped_<key>`` with the DDF's metadata (its
    grid and affine).

    The label is first brought onto the DDF's grid by world coordinates (`LabelsToImageGridd`'s resampling) whenever
    its shape or affine differs (refdrn's inference: the label on the HR grid, the DDF on the upsampled LR grid), and
    the warped label gets the smallest dtype that holds its largest id (`label_dtype`: uint8, int16 or int32), so
    ids such as 300 or 1002 are saved unchanged.

    Source: the spatial transformer that warps the moving image with the predicted deformation (Sun & Simon, "A
    Resolution Enhancement Plug-in for Deformable Registration of Medical Images", Section III-B; Xu et al.,
    "F3RNet: Full-Resolution Residual Registration Network for Multimodal Image Registration", Section 2.1), here
    MONAI ``Warp``.

    Args:
        ddf_key: key of the DDF ``[3, D, H, W]`` (voxels).
        image_key: key of the image to warp ``[C, D, H, W]`` on the DDF's grid (optional in the data).
        label_key: key of the moving label map ``[1, d, h, w]`` on any grid that overlaps the DDF's (optional).
    """

    def __init__(self, ddf_key: str = "pred", image_key: str = "moving_image", label_key: str = "moving_label"):
        super().__init__([image_key, label_key], allow_missing_keys=True)
        self.ddf_key, self.image_key, self.label_key = ddf_key, image_key, label_key
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: a dictionary holding the DDF under ``ddf_key`` and, optionally, the image under ``image_key`` and
                the moving label under ``label_key``.

        Returns:
            a shallow copy of ``data`` with ``warped_<image_key>`` (float32 ``[C, D, H, W]``) and
            ``warped_<label_key>`` (``[1, D, H, W]``, uint8/int16/int32) for the keys present.

        Raises:
            KeyError: when ``ddf_key`` is missing.
            ValueError: when the image's spatial size differs from the DDF's (raised by MONAI's ``Warp``), or the
                label's differs and there is no affine to resample it with.
        """
        d = dict(data)
        ddf = d[self.ddf_key]
        plain_ddf = _plain(ddf)[None].float()
        meta = ddf.meta if isinstance(ddf, MetaTensor) else {}
        if self.image_key in d:
            image = _plain(d[self.image_key])[None].float().to(plain_ddf.device)
            d[f"warped_{self.image_key}"] = MetaTensor(self.warp_image(image, plain_ddf)[0], meta=meta)
        if self.label_key in d:
            label = _to_grid(d[self.label_key], ddf, self.label_key)
            top = int(_plain(label).max()) if label.numel() else 0
            # float32 holds every integer id up to 2**24 exactly; larger ids are warped in float64
            compute = torch.float64 if top > 2**24 else torch.float32
            plain = _plain(label)[None].to(device=plain_ddf.device, dtype=compute)
            warped = self.warp_label(plain, plain_ddf.to(compute))[0].round().to(label_dtype(top))
            d[f"warped_{self.label_key}"] = MetaTensor(warped, meta=meta)
        return d
