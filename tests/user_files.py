"""Helpers of the tests of user files (outputs named per case, label geometry and values, storage orientation):
the bundles' configs run in-process through ``monai.bundle.run`` (what the CLI calls, without its ~10 s of imports),
tiny registration pairs, and copies of a volume stored in another orientation (same world content)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import BUNDLES, load_bundle_scripts, synthetic_labels

# the refdrn and f3rnet test pairs: 64^3 HR grid of 1 mm voxels, LR at 4 mm (refdrn's default scale 4)
HR_AFFINE = np.array([[1.0, 0, 0, -31.5], [0, 1, 0, -31.5], [0, 0, 1, -31.5], [0, 0, 0, 1]])
LR_AFFINE = HR_AFFINE @ np.array([[4.0, 0, 0, 1.5], [0, 4, 0, 1.5], [0, 0, 4, 1.5], [0, 0, 0, 1]])


def run_in_process(bundle: str, configs: str | list[str], **overrides):
    """``monai.bundle.run`` of `bundle`'s config(s) (a list is merged in order, e.g. train.json then evaluate.json)."""
    from monai.bundle import run

    load_bundle_scripts(bundle, "checks")  # this bundle's `scripts` first on sys.path, other bundles' purged
    names = [configs] if isinstance(configs, str) else configs
    files = [str(BUNDLES / bundle / "configs" / c) for c in names]
    return run(
        config_file=files[0] if len(files) == 1 else files,
        bundle_root=str(BUNDLES / bundle),
        logging_file=False,
        **overrides,
    )


def refusal(bundle: str, configs: str | list[str], output_dir: Path, **overrides) -> str:
    """Run a config that must refuse its input: returns the message of the ``BundleInputError`` in the raised chain,
    after checking that nothing was written to `output_dir`."""
    with pytest.raises(Exception) as err:
        run_in_process(bundle, configs, output_dir=str(output_dir), **overrides)
    exc, messages = err.value, []
    while exc is not None:
        if type(exc).__name__ == "BundleInputError":
            messages.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert messages, f"no BundleInputError in {err.value!r}"
    assert not output_dir.exists() or not [p for p in output_dir.rglob("*") if p.is_file()]
    return messages[0]


def save(array: np.ndarray, path: Path, affine: np.ndarray) -> str:
    """Write `array` with `affine` as NIfTI (parents created); returns the path as a string."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def stored_as(src: str | Path, dst: Path, axcodes: str) -> str:
    """A copy of `src` stored in the orientation `axcodes` (e.g. ``"LPS"``, or ``"SPR"`` with the axes permuted):
    the array flipped/transposed and the affine adjusted, so the world content is unchanged."""
    img = nib.load(str(src))
    ornt = nib.orientations.ornt_transform(nib.io_orientation(img.affine), nib.orientations.axcodes2ornt(axcodes))
    out = img.as_reoriented(ornt)
    assert "".join(nib.aff2axcodes(out.affine)) == axcodes
    dst.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(out.dataobj), out.affine), str(dst))
    return str(dst)


def as_ras(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The array and affine of a file reoriented to RAS (its world content), channels last kept."""
    img = nib.as_closest_canonical(nib.load(str(path)))
    return np.asarray(img.dataobj), img.affine


def lr_pair(root: Path, seeds=(3, 4), shape=(64, 64, 64)) -> dict:
    """A refdrn-style pair: LR x4 moving/fixed images (4 mm) and their labels on the 1 mm HR grid (ids 1..4)."""
    files = {}
    for role, seed in zip(("moving", "fixed"), seeds):
        image, labels = synthetic_labels(shape, seed=seed)
        lr = image.reshape(shape[0] // 4, 4, shape[1] // 4, 4, shape[2] // 4, 4).mean((1, 3, 5))
        files[f"{role}_image"] = save(lr, root / f"{role}_lr.nii.gz", LR_AFFINE)
        files[f"{role}_label"] = save(labels, root / f"{role}_labels.nii.gz", HR_AFFINE)
    return files


def hr_pair(root: Path, seeds=(3, 4), shape=(32, 32, 32)) -> dict:
    """A pair on one 1 mm grid (images in [0, 1], labels 1..4), for f3rnet and refdrn's evaluation."""
    files = {}
    for role, seed in zip(("moving", "fixed"), seeds):
        image, labels = synthetic_labels(shape, seed=seed)
        files[f"{role}_image"] = save(image, root / f"{role}_image.nii.gz", HR_AFFINE)
        files[f"{role}_label"] = save(labels, root / f"{role}_labels.nii.gz", HR_AFFINE)
    return files


def datalist(path: Path, items: list[dict], section: str = "test", **extra) -> str:
    """Write a datalist with `items` in `section`; returns its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({section: items, **extra}))
    return str(path)


def read(path: str | Path) -> np.ndarray:
    """The stored array of a NIfTI file (its dtype kept)."""
    return np.asarray(nib.load(str(path)).dataobj)
