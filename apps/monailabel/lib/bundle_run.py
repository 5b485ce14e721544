"""Run a bundle of this package through MONAI's own bundle runner, for the MONAI Label app's infer tasks.

Kept free of MONAI Label imports, so that it is tested in the main environment too (tests/test_monailabel_app.py).

Why the runner, in a child process, rather than MONAI Label's ``BundleInferTask``: that task rebuilds a
bundle's pipeline from its ``preprocessing``/``postprocessing`` items, indexes every ``LoadImaged`` key (rem_sr's
optional ``reference``, the registration bundles' second image) and appends ``Restored``, which puts rem_sr's
super-resolved volume back on the low-resolution grid. The runner gives exactly what ``python -m monai.bundle run``
gives (the same checks of the input, the same output grid and affine, the bundle's own instance optimisation);
the child process keeps each bundle's ``scripts`` package, threads and memory to itself, and the bundle's one-line
error (``error: <file>: <problem>``) becomes the task's error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


class BundleRunError(RuntimeError):
    """The bundle runner failed; the message is the bundle's own error line (or the end of its output)."""


def bundle_command(bundle: Path, overrides: dict, config: str = "inference.json") -> list[str]:
    """The ``python -m monai.bundle run`` command line for `bundle` (a folder) with `overrides` (config id ->
    value; strings are passed as they are, everything else as JSON)."""
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(bundle / "configs" / config),
        "--bundle_root",
        str(bundle),
    ]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return command


def error_line(output: str) -> str:
    """The bundle's error from its output: the last line starting with ``error:`` (how this package's bundles
    report bad input), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.lower().startswith("error:"):
            return line[len("error:") :].strip()
    return lines[-1] if lines else "no output"


def run_bundle(
    bundle: Path, overrides: dict, workdir: Path, threads: int | None = None, timeout_s: float | None = None
) -> float:
    """Run `bundle`'s ``inference.json`` with `overrides` in a child process, in `workdir` (its log goes to
    ``workdir/bundle.log``).

    Args:
        bundle: the bundle folder (``bundles/<name>``).
        overrides: config overrides, e.g. ``{"image": path, "output_dir": dir}``.
        workdir: an existing folder for the run's log and working files.
        threads: torch threads of the child (``OMP_NUM_THREADS``); None keeps the environment's.
        timeout_s: wall-clock limit in seconds; None waits.

    Returns:
        the wall time of the run, in seconds.

    Raises:
        BundleRunError: the runner exited non-zero (the message is the bundle's error line) or ran past
            `timeout_s`.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    env.setdefault("PYTHONUNBUFFERED", "1")
    log = workdir / "bundle.log"
    start = time.monotonic()
    with open(log, "w") as out:
        try:
            proc = subprocess.run(
                bundle_command(bundle, overrides),
                cwd=workdir,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BundleRunError(f"{bundle.name} ran past {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise BundleRunError(error_line(log.read_text(errors="replace")))
    return time.monotonic() - start


def find_output(output_dir: Path, postfix: str) -> Path:
    """The one ``*_<postfix>.nii.gz`` file a single-input run wrote under `output_dir` (the bundles write
    ``<output_dir>/<name>/<name>_<postfix>.nii.gz``).

    Raises:
        BundleRunError: none, or more than one, such file.
    """
    found = sorted(output_dir.glob(f"*/*_{postfix}.nii.gz"))
    if len(found) != 1:
        raise BundleRunError(f"expected one *_{postfix}.nii.gz under {output_dir}, found {len(found)}")
    return found[0]
