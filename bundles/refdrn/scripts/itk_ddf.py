"""The registration DDF in the ITK convention, shared by the refdrn and f3rnet_ct_mri bundles.

This file is a deliberate, identical copy in ``bundles/{refdrn,f3rnet_ct_mri}/scripts/itk_ddf.py``, so that each
bundle keeps working when it is copied out on its own. Edit the copy in ``refdrn`` and run
``python tools/sync_common.py``; ``tests/test_common_copies.py`` fails while the copies differ.

Two conventions for one deformation, on the fixed image's grid with affine ``A`` (voxel index ``i`` -> world
point ``x = A i``, RAS mm, as nibabel reports it):

- MONAI (``<case>_ddf.nii.gz``, what MONAI ``Warp`` reads): ``u(i)`` in voxels, channel ``k`` = displacement along
  array axis ``k``; the warped image is ``moving[i + u(i)]`` (array indices).
- ITK (``<case>_ddf_itk.nii.gz``, what ITK's ``DisplacementFieldTransform`` and ``antsApplyTransforms`` read):
  ``d(x)`` in mm in LPS (``x`` to the left, ``y`` posterior, ``z`` superior), stored 5D ``(X, Y, Z, 1, 3)`` with
  NIfTI intent ``vector``; the warped image is ``moving(x + d(x))`` (world points). With
  ``d_RAS = A[:3, :3] u(i)``, ``d_LPS = (-d_RAS[0], -d_RAS[1], d_RAS[2])``.

Both pipelines check that the moving and fixed images share one world grid (`scripts.pairs.check_pairs`), so
``moving[i + u(i)]`` and ``moving(x + d(x))`` are the same sample.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import FolderLayout, MetaTensor
from monai.data.folder_layout import default_name_formatter
from monai.transforms import MapTransform

from .common import atomic_write_bytes, write_in_background

__all__ = ["SaveITKDDFd", "itk_ddf_image", "monai_to_itk_ddf"]

RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _numpy(x, dtype: torch.dtype = torch.float64) -> np.ndarray:
    return np.asarray(torch.as_tensor(x).as_subclass(torch.Tensor).detach().to(dtype).cpu())


def monai_to_itk_ddf(ddf, affine) -> np.ndarray:
    """Convert a MONAI DDF (voxels, channel ``k`` along array axis ``k``) to ITK's displacement vectors.

    Args:
        ddf: the DDF ``[3, X, Y, Z]`` in voxels of the grid of `affine` (tensor or array).
        affine: that grid's voxel-to-world affine ``[4, 4]`` (RAS mm, nibabel's convention).

    Returns:
        float32 ``[X, Y, Z, 3]`` in Fortran order (NIfTI's: x fastest, then y, z, the component): ``d(x)`` in mm,
        LPS, at the world point ``x = affine @ i`` of each voxel ``i``.

    Raises:
        ValueError: `ddf` is not ``[3, X, Y, Z]`` or `affine` not ``[4, 4]``.
    """
    u = _numpy(ddf, torch.float32)
    a = _numpy(affine)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if u.ndim != 4 or u.shape[0] != 3:
        raise ValueError(f"a 3D DDF needs shape [3, X, Y, Z], got {tuple(u.shape)}")
    if a.shape != (4, 4):
        raise ValueError(f"the affine must be [4, 4], got {tuple(a.shape)}")
    # one component at a time in float32, written straight into NIfTI's order (no float64 or [..., 3] copies)
    rotation = (a[:3, :3] * RAS_TO_LPS[:, None]).astype(np.float32)
    out = np.empty((*u.shape[1:], 3), dtype=np.float32, order="F")
    for k in range(3):
        component = rotation[k, 0] * u[0]
        for j in (1, 2):
            component += rotation[k, j] * u[j]
        out[..., k] = component
    return out


def itk_ddf_image(ddf, affine) -> nib.Nifti1Image:
    """The ITK-convention displacement-field NIfTI of a MONAI DDF (`monai_to_itk_ddf`).

    Args:
        ddf: the DDF ``[3, X, Y, Z]`` in voxels of the grid of `affine`.
        affine: that grid's affine ``[4, 4]`` (RAS mm).

    Returns:
        a float32 ``(X, Y, Z, 1, 3)`` NIfTI-1 image with intent ``vector`` (1007), `affine` as sform and qform
        (code 1, scanner), spatial units mm.

    Raises:
        ValueError: as `monai_to_itk_ddf`.
    """
    a = _numpy(affine)
    a = a[0] if a.ndim == 3 else a
    vectors = monai_to_itk_ddf(ddf, a)[:, :, :, None, :]  # float32, Fortran order: written without a copy
    img = nib.Nifti1Image(vectors, a)
    img.header.set_intent("vector")
    img.header.set_xyzt_units("mm")
    img.set_sform(a, code=1)
    img.set_qform(a, code=1)
    return img


def _write_gzip(path: str, img: nib.Nifti1Image) -> None:
    # level 1, as nibabel writes the other outputs: a float field barely compresses further, at 3x the time
    atomic_write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=1))


class SaveITKDDFd(MapTransform):
    """Save each DDF under `keys` a second time, in the ITK convention (`itk_ddf_image`), beside the MONAI one:
    ``output_dir/<name>/<name>_<output_postfix>.nii.gz``, named as MONAI ``SaveImaged`` names its files (the
    ``filename_or_obj`` meta entry, `scripts.common.CaseNamed`), written atomically.

    Args:
        keys: the DDF key(s), MetaTensors ``[3, X, Y, Z]`` in voxels with the affine of their grid (after
            `scripts.common.RestoreOrientationd`: the fixed file's orientation).
        output_dir: the output folder.
        output_postfix: the file name's postfix.
        separate_folder: one folder per case, as ``SaveImaged(separate_folder=True)``.
        background: compress and write in a writer thread (`scripts.common.write_in_background`; the bundle's
            ``OutputPathsHandler`` waits for it at the end of the iteration).
        allow_missing_keys: don't raise an exception when a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str,
        output_postfix: str = "ddf_itk",
        separate_folder: bool = True,
        background: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.background = background
        self.layout = FolderLayout(
            str(output_dir), postfix=output_postfix, extension=".nii.gz", parent=separate_folder, makedirs=False
        )

    def __call__(self, data: Mapping) -> dict:
        """
        Args:
            data: one case (decollated) holding the DDFs under ``keys``.

        Returns:
            ``data`` (a shallow copy), unchanged; the files are written.

        Raises:
            KeyError: a key is missing and ``allow_missing_keys`` is false.
            ValueError: a DDF is not a MetaTensor ``[3, X, Y, Z]`` (no affine: no world grid to put it on).
        """
        d = dict(data)
        for key in self.key_iterator(d):
            ddf = d[key]
            if not isinstance(ddf, MetaTensor):
                raise ValueError(f"{key}: the ITK DDF needs the DDF's affine, got a plain {type(ddf).__name__}")
            path = self.layout.filename(**default_name_formatter(ddf.meta, self))
            img = itk_ddf_image(ddf, ddf.affine)
            if self.background:
                write_in_background(_write_gzip, path, img)
            else:
                _write_gzip(path, img)
        return d
