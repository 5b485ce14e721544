#!/usr/bin/env python
"""Register one pair with a classical peer and write its dense displacement field in the ITK convention.

Runs in the peers venv (``.venv-peers``, ``make peers-venv``: itk-elastix, antspyx, SimpleITK), never in the main
one: antspyx pins numpy below the main environment's. ``tools/benchmark.py`` starts it once per pair and method,
in its own process, so that the peak memory measured is the peer's own.

Methods (default settings of each tool, as a user would call it):

- ``elastix``: itk-elastix, the default ``affine`` then ``bspline`` parameter maps (both Mattes mutual
  information, ``AdvancedMattesMutualInformation``); the field from transformix (``transformix_deformation_field``).
- ``ants_syn_mi``: antspyx ``ants.registration(type_of_transform="SyN")`` (affine initialisation + SyN) with the
  Mattes MI metric; the affine and the warp composed into one field (``apply_transforms(compose=...)``).
- ``ants_syn_cc``: the same with the cross-correlation metric for SyN (``syn_metric="CC"``, radius 4), the
  classical choice for a same-modality pair; mutual information for the affine stage.
- ``demons``: SimpleITK ``DiffeomorphicDemonsRegistrationFilter`` (100 iterations, field smoothing 1.5 voxels)
  after histogram matching of the moving image to the fixed one, on the fixed grid (the moving image resampled
  onto it first); same modality only.

Output: ``--out`` is a NIfTI displacement field on the fixed image's grid, physical millimetres in LPS, ``x_fixed +
u(x_fixed)`` is the corresponding point of the moving image (the ITK ``DisplacementFieldTransform`` convention),
5D ``(X, Y, Z, 1, 3)`` with intent vector. The last line on stdout is JSON: ``{"seconds": <registration wall time,
field included, reading the images excluded>}``. Threads: ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` (set by the
caller; elastix's own ``number_of_threads`` argument crashes with B-spline stages).

Usage: run_peer.py METHOD --fixed F.nii.gz --moving M.nii.gz --out FIELD.nii.gz
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("elastix", "ants_syn_mi", "ants_syn_cc", "demons")


def elastix(fixed: str, moving: str, out: str) -> float:
    """itk-elastix affine + B-spline (Mattes MI), field by transformix; returns the registration seconds."""
    import itk

    fixed_img, moving_img = itk.imread(fixed, itk.F), itk.imread(moving, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        _, transform = itk.elastix_registration_method(
            fixed_img, moving_img, parameter_object=params, log_to_console=False, output_directory=tmp
        )
        field = itk.transformix_deformation_field(moving_img, transform, output_directory=tmp)
        seconds = time.perf_counter() - start
    itk.imwrite(field, out)
    return seconds


def ants_syn(fixed: str, moving: str, out: str, metric: str) -> float:
    """antspyx SyN (affine initialisation, then SyN with `metric`), composed into one field; registration seconds."""
    import ants

    fixed_img, moving_img = ants.image_read(fixed), ants.image_read(moving)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        options = {"syn_metric": "CC", "syn_sampling": 4} if metric == "CC" else {"syn_metric": "mattes"}
        reg = ants.registration(
            fixed=fixed_img,
            moving=moving_img,
            type_of_transform="SyN",
            aff_metric="mattes",
            outprefix=str(Path(tmp) / "reg_"),
            **options,
        )
        composed = ants.apply_transforms(
            fixed=fixed_img, moving=moving_img, transformlist=reg["fwdtransforms"], compose=str(Path(tmp) / "fwd_")
        )
        seconds = time.perf_counter() - start
        shutil.copyfile(composed, out)
    return seconds


def demons(fixed: str, moving: str, out: str) -> float:
    """SimpleITK diffeomorphic demons on the fixed grid (histogram-matched moving); registration seconds."""
    import SimpleITK as sitk

    fixed_img = sitk.ReadImage(fixed, sitk.sitkFloat32)
    moving_img = sitk.ReadImage(moving, sitk.sitkFloat32)
    start = time.perf_counter()
    on_fixed = sitk.Resample(moving_img, fixed_img, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    matched = sitk.HistogramMatching(on_fixed, fixed_img, 256, 7, True)
    filt = sitk.DiffeomorphicDemonsRegistrationFilter()
    filt.SetNumberOfIterations(100)
    filt.SetStandardDeviations(1.5)
    field = filt.Execute(fixed_img, matched)
    seconds = time.perf_counter() - start
    sitk.WriteImage(sitk.Cast(field, sitk.sitkVectorFloat32), out)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=METHODS)
    parser.add_argument("--fixed", required=True)
    parser.add_argument("--moving", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for path in (args.fixed, args.moving):
        if not Path(path).is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
    if args.method == "elastix":
        seconds = elastix(args.fixed, args.moving, args.out)
    elif args.method == "demons":
        seconds = demons(args.fixed, args.moving, args.out)
    else:
        seconds = ants_syn(args.fixed, args.moving, args.out, "CC" if args.method == "ants_syn_cc" else "MI")
    print(json.dumps({"seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
