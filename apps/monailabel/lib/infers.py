"""MONAI Label infer tasks that serve this package's bundles: super-resolution, and atlas-based segmentation by
registration (label propagation).

Each task runs the bundle's own ``configs/inference.json`` through MONAI's bundle runner (see
:mod:`lib.bundle_run` for why), with the shipped weights and the bundle's defaults, and returns its output file:

- :class:`SuperResolutionTask` (``rem_sr``): the SR volume, on the high-resolution grid that rem_sr writes (not
  restored to the input's grid). MONAI Label type ``others``: the result is an image, not a label map.
- :class:`AtlasSegmentationTask` (``refdrn``, ``f3rnet_ct_mri``): the annotator's image is the *fixed* image, a
  labelled atlas shipped with the app (``tools/make_label_atlases.py``) the *moving* one; the result is the atlas's
  label map warped by the bundle's DDF (nearest neighbour, so label ids are kept), on the grid the bundle's DDF
  lives on: the fixed image's own grid for f3rnet_ct_mri, and refdrn's super-resolved grid (its input's ×4) for
  refdrn. MONAI Label type ``segmentation``. The bundle's instance optimisation runs unless the request sets
  ``instance_optimisation`` to false (``--io_iterations 0``: the network alone).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from monai.utils import str2bool
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.bundle_run import BundleRunError, find_output, run_bundle

logger = logging.getLogger(__name__)


class BundleRunnerTask(InferTask):
    """One bundle's ``inference.json`` on the requested image, as a MONAI Label infer task.

    Args:
        bundle: the bundle folder (``bundles/<name>``).
        type: MONAI Label infer type.
        labels: label name -> id of the result (``{}`` for an image result).
        description: shown by MONAI Label clients.
        postfix: the output file to return, ``<name>_<postfix>.nii.gz`` of the bundle's output folder.
        threads: torch threads of each run; None keeps the server's environment.
        timeout_s: wall-clock limit of one run, in seconds.
        config: options shown to clients (name -> default).
    """

    def __init__(
        self,
        bundle: Path,
        type: InferType,
        labels: dict[str, int],
        description: str,
        postfix: str,
        threads: int | None = None,
        timeout_s: float | None = None,
        config: dict[str, Any] | None = None,
    ):
        super().__init__(type=type, labels=labels, dimension=3, description=description, config=config)
        self.bundle = Path(bundle)
        self.postfix = postfix
        self.threads = threads
        self.timeout_s = timeout_s

    def missing(self) -> str | None:
        """Why the task cannot run (a file it needs is missing), or None."""
        for path in (self.bundle / "configs" / "inference.json", self.bundle / "configs" / "metadata.json"):
            if not path.is_file():
                return f"{path} not found"
        return None

    def is_valid(self) -> bool:
        return self.missing() is None

    def info(self) -> dict[str, Any]:
        info = super().info()
        info["version"] = self.version()
        info["bundle"] = self.bundle.name
        return info

    def version(self) -> str | None:
        try:
            return json.loads((self.bundle / "configs" / "metadata.json").read_text()).get("version")
        except (OSError, ValueError):
            return None

    def inputs(self, image: str, request: dict) -> dict:
        """The bundle's input overrides for `image` and the request's options (the output folder is added)."""
        return {}

    def __call__(self, request: dict) -> tuple[str, dict]:
        image = request.get("image")
        if not isinstance(image, str) or not os.path.isfile(image):
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, f"{self.bundle.name}: no image file: {image!r}")
        workdir = Path(tempfile.mkdtemp(prefix=f"monailabel-{self.bundle.name}-"))
        try:
            output_dir = workdir / "out"
            overrides = {**self.inputs(image, request), "output_dir": str(output_dir)}
            seconds = run_bundle(self.bundle, overrides, workdir, self.threads, self.timeout_s)
            found = find_output(output_dir, self.postfix)
            # outside the working folder, which is removed; MONAI Label deletes the result after sending it
            handle, result = tempfile.mkstemp(prefix=f"{self.bundle.name}-", suffix=".nii.gz")
            os.close(handle)
            shutil.move(str(found), result)
        except BundleRunError as e:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR, f"{self.bundle.name} on {os.path.basename(image)}: {e}"
            ) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        logger.info(f"{self.bundle.name}: {os.path.basename(image)} -> {result} in {seconds:.1f} s")
        return result, {
            "bundle": self.bundle.name,
            "version": self.version(),
            "seconds": round(seconds, 2),
            "label_names": self.labels,
        }


class SuperResolutionTask(BundleRunnerTask):
    """rem_sr on the requested low-resolution MR: the SR volume on the high-resolution grid (rem_sr's default
    weights per kind of input, its scale read from the input's spacing)."""

    def __init__(self, bundle: Path, threads: int | None = None, timeout_s: float | None = None):
        super().__init__(
            bundle,
            InferType.OTHERS,
            {},
            "REM super-resolution of a low-resolution brain MR (x2, x4, thick slices): the SR volume on the "
            "high-resolution grid",
            "sr",
            threads,
            timeout_s,
        )

    def inputs(self, image: str, request: dict) -> dict:
        return {"image": image}


class AtlasSegmentationTask(BundleRunnerTask):
    """Label propagation: the atlas (image and labels, ``<atlas>/image.nii.gz``, ``label.nii.gz`` and
    ``atlas.json`` with the label names) registered onto the requested image by the bundle; returns the warped
    atlas labels.

    Args:
        bundle: ``bundles/refdrn`` or ``bundles/f3rnet_ct_mri``.
        atlas: the atlas folder (``tools/make_label_atlases.py``).
        extra: fixed overrides of the bundle for this task (e.g. ``{"direction": "ct2mri"}``).
    """

    def __init__(
        self,
        bundle: Path,
        atlas: Path,
        description: str,
        extra: dict | None = None,
        threads: int | None = None,
        timeout_s: float | None = None,
    ):
        self.atlas = Path(atlas)
        meta = self.atlas / "atlas.json"
        labels = json.loads(meta.read_text())["labels"] if meta.is_file() else {}
        super().__init__(
            bundle,
            InferType.SEGMENTATION,
            labels,
            description,
            "warped_label",
            threads,
            timeout_s,
            config={"instance_optimisation": True},
        )
        self.extra = dict(extra or {})

    def missing(self) -> str | None:
        for name in ("image.nii.gz", "label.nii.gz", "atlas.json"):
            if not (self.atlas / name).is_file():
                return f"atlas file {self.atlas / name} not found: run `make label-atlases`"
        return super().missing()

    def inputs(self, image: str, request: dict) -> dict:
        overrides = {
            **self.extra,
            "fixed_image": image,
            "moving_image": str(self.atlas / "image.nii.gz"),
            "moving_label": str(self.atlas / "label.nii.gz"),
        }
        if not str2bool(request.get("instance_optimisation", True)):
            overrides["io_iterations"] = 0  # the network's DDF alone
        return overrides
