"""Atomic output writing shared by the tools: write under a temporary name, then rename, so an
interrupted run never leaves a half-written file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import nibabel as nib


def atomic_write(target: Path, write) -> None:
    """Call ``write(tmp)`` with a path of the same file name in a private temporary folder next to `target`, then
    rename it over `target`; nothing is left behind on failure. Keeping the name matters to writers that derive
    content or format from it (nibabel's extension, the archive root of torch.jit.save / zip files)."""
    target = Path(target)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        tmp = tmp_dir / target.name
        write(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def atomic_save(img: nib.Nifti1Image, path: Path) -> None:
    def write(tmp: Path) -> None:
        nib.save(img, tmp)
        os.chmod(tmp, 0o644)

    atomic_write(path, write)


def atomic_write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def crop_or_pad(data, affine, start, shape, fill: float = 0.0):
    """The `shape` box of `data` starting at voxel `start` (may be negative or run past the end: padded with `fill`),
    with the affine translated so world coordinates are kept."""
    import numpy as np

    start = np.asarray(start, dtype=int)
    out = np.full(tuple(shape), fill, dtype=data.dtype)
    src_lo = np.maximum(start, 0)
    src_hi = np.minimum(start + np.asarray(shape), data.shape)
    dst_lo = src_lo - start
    dst_hi = dst_lo + (src_hi - src_lo)
    out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = data[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, new_affine


def fail(message: str) -> SystemExit:
    """The one-line error of a tool: ``raise fail("...")`` exits with code 1 and ``error: ...``, no traceback."""
    return SystemExit(f"error: {message}")


def read_volume(path: Path, what: str = "volume"):
    """Data and affine of a NIfTI/Analyze volume, read with nibabel (the tools' one reader).

    Trailing singleton axes of any count are squeezed ((x, y, z, 1, 1) -> (x, y, z)); a non-singleton axis beyond the
    third, or fewer than three axes, is an error naming the file and its shape. Floating-point data must be finite.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise fail(f"{what} {path} not found")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for broken headers/truncated data
        raise fail(f"cannot read {what} {path}: {exc}") from None
    shape = tuple(int(n) for n in img.shape)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise fail(
            f"{what} {path} has shape {shape}; expected a 3D volume (x, y, z), optionally with trailing singleton axes"
        )
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        raise fail(f"{what} {path} contains NaN or infinite values")
    return data, np.asarray(img.affine, dtype=np.float64)


def check_label_values(data, path: Path, what: str = "label"):
    """`data` as int64 label ids; non-integer, non-finite or negative values are an error naming the file."""
    import numpy as np

    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all():
            raise fail(f"{what} {path} contains NaN or infinite values; a label map holds integer ids >= 0")
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            bad = data[rounded != data]
            raise fail(
                f"{what} {path} holds non-integer values (e.g. {float(bad.flat[0]):g}); a label map holds integer ids"
            )
        data = rounded
    elif not np.issubdtype(data.dtype, np.integer) and data.dtype != bool:
        raise fail(f"{what} {path} has data type {data.dtype}; a label map holds integer ids")
    data = np.asarray(data).astype(np.int64)
    if data.size and data.min() < 0:
        raise fail(f"{what} {path} holds negative values (lowest {int(data.min())}); label ids must be >= 0")
    return data


def same_grid(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    """Whether two volumes share one voxel grid: equal shapes and affines equal within `atol` mm."""
    import numpy as np

    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def label_onto_grid(label, label_affine, shape, affine, label_path: Path, image_path: Path):
    """The label map `label` resampled by world coordinates, nearest neighbour, onto the grid (`shape`, `affine`) of
    its image; returned unchanged when it already lies on that grid. Voxels outside the label's extent become 0. A
    label that does not overlap its image at all is an error naming both files and their affines."""
    import numpy as np
    from scipy import ndimage

    if same_grid(label.shape, label_affine, shape, affine):
        return label
    vox = np.linalg.inv(label_affine) @ affine  # image voxel -> label voxel
    corners = np.array(
        [[x, y, z, 1.0] for x in (0, shape[0] - 1) for y in (0, shape[1] - 1) for z in (0, shape[2] - 1)]
    )
    mapped = (vox @ corners.T)[:3].T
    lo, hi = mapped.min(axis=0), mapped.max(axis=0)
    if np.any(hi < -0.5) or np.any(lo > np.array(label.shape) - 0.5):
        raise fail(
            f"label {label_path} (shape {tuple(label.shape)}, affine {np.round(label_affine, 3).tolist()}) does not "
            f"overlap its image {image_path} (shape {tuple(shape)}, affine {np.round(affine, 3).tolist()})"
        )
    return ndimage.affine_transform(
        label, vox[:3, :3], offset=vox[:3, 3], output_shape=tuple(shape), order=0, mode="constant", cval=0
    )


def prepare_out_dir(out: Path, subdirs=()) -> None:
    """Create `out` and its `subdirs` and check that a file can be written there, before any work: an existing
    file in the way or a folder without write permission is an error naming the path."""
    out = Path(out)
    for folder in [out, *(out / s for s in subdirs)]:
        if folder.exists() and not folder.is_dir():
            raise fail(f"output path {folder} exists and is not a folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = Path(tempfile.mkdtemp(prefix=".write-test-", dir=folder))
            probe.rmdir()
        except OSError as exc:
            raise fail(f"cannot write to the output folder {folder}: {exc.strerror or exc}") from None
