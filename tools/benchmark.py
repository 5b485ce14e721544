#!/usr/bin/env python
"""The bundles against the classical tools, side by side, on the same pairs (or volumes), measured one way.

Registration (``python tools/benchmark.py refdrn`` or ``f3rnet_ct_mri``), on any registration datalist
(``fixed_image``, ``moving_image``, ``fixed_label``, ``moving_label``; paths relative to ``--dataset_dir``):

- methods: ``identity``; the bundle as a user runs it (``configs/inference.json`` through MONAI's runner, with
  ``--moving_image``/``--fixed_image``); ``elastix`` (itk-elastix affine + B-spline, Mattes MI); ``ants_syn_mi`` and
  ``ants_syn_cc`` (antspyx SyN); ``demons`` (SimpleITK, optional). The peers run in ``.venv-peers``
  (``make peers-venv``) through ``tools/peers/run_peer.py``; without it they are skipped with the reason printed.
- every method's result is one ITK-convention displacement field file (the bundles write ``<case>_ddf_itk.nii.gz``
  beside their MONAI one), turned by :func:`itk_field_to_ddf` into ONE convention: a DDF ``[3, X, Y, Z]`` in voxels
  of the fixed label's grid, as MONAI's ``Warp`` reads it. The moving label is resampled onto that grid (nearest,
  world coordinates) when it is stored on another one, and warped with ``Warp(mode="nearest")``.
- the same code then measures every method: Dice per label and its mean (MONAI ``DiceMetric``, labels renumbered
  1..K over the pair's label ids), HD95 and ASD in mm (MONAI's ``HausdorffDistanceMetric`` /
  ``SurfaceDistanceMetric`` with the label's spacing, per label, then averaged), folding % (det J <= 0), SDlogJ
  (Learn2Reg), the registration's wall time, the whole process's wall time, and the process's peak RSS.
- each method runs in its own process (``tools/resources.py``), all with the same thread count (``--threads``,
  printed; ``OMP_NUM_THREADS`` and ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``).

Super-resolution (``python tools/benchmark.py rem_sr``): each method of rem_sr's ``evaluate.json`` (nearest,
trilinear, cubic B-spline, REM) at ``--scale`` (``4``, or ``1x1x4`` for 4 mm thick axial slices with a Gaussian slice
profile) on the test volumes, each run in its own measured process: PSNR and SSIM in the brain and over the volume
(the bundle's own metric code), the method's wall time and the peak RSS. On thick-slice input ``eclare`` (ECLARE,
PyPI ``eclare``, self-supervised: it trains on each volume) joins them from ``.venv-eclare`` (``make eclare-venv``)
with a reduced budget (``--eclare_patches``), on the same LR volume, scored by the same metric classes.

Outputs in ``--output_dir`` (default ``outputs/benchmark/<bundle>``): ``results.csv`` (a row per pair and method),
``dice_per_label.csv`` (registration), ``summary.md`` (mean ± std per method, with ratios of time and peak RSS to
elastix, or to cubic B-spline for SR) and ``benchmark.png`` (Dice or PSNR per method as a box plot, time per method
on a log axis).

Usage:
    python tools/benchmark.py refdrn [--datalist D --dataset_dir DIR --section test] [--methods ...] [--threads 2]
    python tools/benchmark.py rem_sr [--scale 4 | --scale 1x1x4] [--threads 2] [--eclare_patches 10000]

With ``--card`` the summary also goes into the bundle's model card and the README, between
``<!-- benchmark:<bundle>:start -->`` and ``<!-- benchmark:<bundle>:end -->``.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import io
import json
import math
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.compare_methods import bundle_run_command, bundle_scripts  # noqa: E402
from tools.niftiio import atomic_write, atomic_write_text  # noqa: E402
from tools.resources import run_measured, thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
ECLARE = ROOT / ".venv-eclare" / "bin" / "run-eclare"
RUN_PEER = ROOT / "tools" / "peers" / "run_peer.py"
PEERS = ("elastix", "ants_syn_mi", "ants_syn_cc", "demons")
REGISTRATION_BUNDLES = ("refdrn", "f3rnet_ct_mri")
# defaults per bundle: its test datalist, and the methods (demons: same modality only)
DEFAULTS = {
    "refdrn": {
        "datalist": "data/brain_pairs/datalist_lr_x4.json",
        "methods": [
            "identity",
            "refdrn",
            "refdrn:network",
            "refdrn:io_from_identity",
            "elastix",
            "ants_syn_mi",
            "ants_syn_cc",
        ],
    },
    "f3rnet_ct_mri": {
        "datalist": "data/abdomen_phantoms/datalist_ct2mri.json",
        "methods": [
            "identity",
            "f3rnet_ct_mri",
            "f3rnet_ct_mri:network",
            "f3rnet_ct_mri:io_from_identity",
            "elastix",
            "ants_syn_mi",
            "ants_syn_cc",
        ],
    },
    "rem_sr": {"datalist": "data/brain/datalist.json", "methods": ["nearest", "trilinear", "bspline", "rem"]},
}
REFERENCE = {"registration": "elastix", "sr": "bspline"}  # the summary's ratios are to this method
# registration bundle variants, ``<bundle>:<variant>``: inference.json overrides (the bundle alone is its default,
# the network's field refined by instance optimisation)
VARIANTS = {
    "network": {"io_iterations": 0},  # the network's field alone
    "io_from_identity": {"io_init": "identity"},  # the ablation: IO from zero displacement, the network's field unused
}


# ------------------------------------------------------------------------------------------------ conventions
def itk_field_to_ddf(field, affine: np.ndarray, shape) -> np.ndarray:
    """A displacement field in the ITK convention, as a MONAI DDF on another grid.

    Args:
        field: a nibabel image of the field: physical mm in LPS, ``(X, Y, Z, 1, 3)`` or ``(X, Y, Z, 3)``, where
            ``x + u(x)`` is the moving point of fixed point ``x`` (ITK ``DisplacementFieldTransform``,
            antsApplyTransforms, transformix), on any grid.
        affine: the ``4 x 4`` RAS voxel-to-mm affine of the target grid (the fixed label's).
        shape: the target grid's ``(X, Y, Z)``.

    Returns:
        ``[3, X, Y, Z]`` float32 displacements in voxels of the target grid, channel ``c`` along array axis ``c``
        (MONAI ``Warp``): the field is sampled (trilinear, nearest value outside its grid) at each target voxel's
        position, and the moving point ``x + u`` is mapped back to target voxel indices. Exact when the field is on
        the target grid.

    Raises:
        ValueError: the field does not hold 3 vector components.
    """
    from scipy.ndimage import map_coordinates

    data = np.asarray(field.dataobj, np.float64)
    if data.ndim not in (4, 5) or data.shape[-1] != 3:
        raise ValueError(f"an ITK displacement field has 3 components in its last axis, got shape {data.shape}")
    data = data.reshape(*data.shape[:3], 3)
    shape = tuple(int(s) for s in shape)
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    ras = affine[:3, :3] @ index + affine[:3, 3:]
    to_field = np.linalg.inv(field.affine)
    field_index = to_field[:3, :3] @ ras + to_field[:3, 3:]
    u_lps = np.stack([map_coordinates(data[..., c], field_index, order=1, mode="nearest") for c in range(3)])
    moved_ras = ras + u_lps * np.array([[-1.0], [-1.0], [1.0]])  # LPS -> RAS: x and y change sign
    to_target = np.linalg.inv(affine)
    moved_index = to_target[:3, :3] @ moved_ras + to_target[:3, 3:]
    return (moved_index - index).reshape(3, *shape).astype(np.float32)


def image_on_grid(image, affine: np.ndarray, shape) -> np.ndarray:
    """An image's intensities on another grid (trilinear in world coordinates; nearest value outside), float32."""
    from scipy.ndimage import affine_transform

    to_image = np.linalg.inv(image.affine) @ affine
    data = np.asarray(image.dataobj, np.float32)
    return affine_transform(data, to_image[:3, :3], to_image[:3, 3], output_shape=tuple(shape), order=1, mode="nearest")


def upsampled_pair(pair: dict, folder: Path) -> dict:
    """The pair with each image resampled onto its own label's grid (trilinear ↓↑), where the two grids differ.

    The peers then register at the labels' resolution, as the bundles do on their upsampled grid; an image already
    on its label's grid is used as it is.
    """
    import nibabel as nib

    out = dict(pair)
    for role in ("moving", "fixed"):
        image, label = nib.load(pair[f"{role}_image"]), nib.load(pair[f"{role}_label"])
        if image.shape[:3] == label.shape[:3] and np.allclose(image.affine, label.affine, atol=1e-4):
            continue
        path = folder / f"{role}_on_label_grid.nii.gz"
        nib.save(nib.Nifti1Image(image_on_grid(image, label.affine, label.shape[:3]), label.affine), str(path))
        out[f"{role}_image"] = str(path)
    return out


def labels_on_grid(label, affine: np.ndarray, shape) -> np.ndarray:
    """A label image's ids on another grid (nearest neighbour in world coordinates; 0 outside)."""
    from scipy.ndimage import affine_transform

    if label.shape[:3] == tuple(shape) and np.allclose(label.affine, affine, atol=1e-4):
        return np.asarray(label.dataobj).astype(np.int64)
    to_label = np.linalg.inv(label.affine) @ affine
    data = np.asarray(label.dataobj).astype(np.float64)
    out = affine_transform(data, to_label[:3, :3], to_label[:3, 3], output_shape=tuple(shape), order=0, cval=0)
    return np.rint(out).astype(np.int64)


# ------------------------------------------------------------------------------------------------ metrics
def registration_metrics(
    ddf: np.ndarray, moving_label: np.ndarray, fixed_label: np.ndarray, affine: np.ndarray, surface: bool = True
):
    """The benchmark's metrics of one DDF, the same code for every method.

    Args:
        ddf: ``[3, X, Y, Z]`` voxels on the fixed label's grid (MONAI ``Warp`` convention).
        moving_label, fixed_label: ``[X, Y, Z]`` label ids on that grid.
        affine: the grid's RAS affine (its spacing gives HD95 and ASD in mm).
        surface: False skips HD95 and ASD (NaN), the slow part with many labels (``tools/demo.py`` reports Dice).

    Returns:
        ``(metrics, dice_per_label)``: ``{"dice", "hd95", "asd", "folding", "sdlogj"}`` (Dice mean over the
        fixed label's ids > 0; distances in mm, mean over labels, non-finite values left out) and
        ``{label id: Dice}``.
    """
    import torch
    from monai.data import MetaTensor
    from monai.metrics import DiceMetric
    from monai.networks.blocks import Warp

    rm = bundle_scripts(ROOT / "bundles" / "refdrn", "registration_metrics")
    ids = np.union1d(np.unique(fixed_label), np.unique(moving_label))
    ids = ids[ids > 0]
    # ids 1..K in the order of the pair's label ids (0 stays 0); every value of both maps is in [0, *ids]
    moving = np.searchsorted(np.r_[0, ids], moving_label)
    fixed = np.searchsorted(np.r_[0, ids], fixed_label)
    num_classes = len(ids) + 1
    flow = torch.as_tensor(ddf, dtype=torch.float32)[None]
    warped = Warp(mode="nearest", padding_mode="zeros")(torch.as_tensor(moving, dtype=torch.float32)[None, None], flow)
    warped = warped.round()
    fixed_t = MetaTensor(torch.as_tensor(fixed, dtype=torch.float32)[None, None], affine=torch.as_tensor(affine))
    dice = DiceMetric(include_background=False, num_classes=num_classes, reduction="none")(warped, fixed_t)[0]
    dice = dice.double().numpy()
    present = np.isin(np.arange(1, num_classes), fixed[fixed > 0])
    hd = rm.PhysicalHausdorffDistanceMetric(percentile=95, num_classes=num_classes, reduction="none")
    asd = rm.PhysicalSurfaceDistanceMetric(symmetric=True, num_classes=num_classes, reduction="none")
    nan = np.full(num_classes - 1, np.nan)
    hd95 = hd(warped, fixed_t)[0].double().numpy() if surface else nan
    asd_v = asd(warped, fixed_t)[0].double().numpy() if surface else nan

    def finite_mean(v):
        v = v[np.isfinite(v)]
        return float(v.mean()) if v.size else float("nan")

    metrics = {
        "dice": finite_mean(dice[present]),
        "hd95": finite_mean(hd95[present]),
        "asd": finite_mean(asd_v[present]),
        "folding": rm.folding_percent(flow[0]),
        "sdlogj": rm.sdlogj(flow[0]),
    }
    per_label = {int(i): float(dice[k]) for k, i in enumerate(ids) if present[k]}
    return metrics, per_label


# ------------------------------------------------------------------------------------------------ methods
def peer_python(method: str) -> tuple[str | None, str]:
    """The interpreter that runs peer `method`, or None and the reason there is none.

    The peers venv runs every peer; without it, elastix runs in this venv when itk-elastix is installed here
    (``requirements-dev.txt`` installs it, so CI runs elastix); ANTs and SimpleITK need the peers venv.
    """
    if PEERS_PYTHON.is_file():
        return str(PEERS_PYTHON), ""
    if method == "elastix" and importlib.util.find_spec("itk") is not None:
        import itk

        if hasattr(itk, "elastix_registration_method"):
            return sys.executable, ""
    return None, f"{PEERS_PYTHON} is absent (run `make peers-venv`)"


def run_bundle_method(
    bundle: str,
    item: dict,
    work: Path,
    threads: int,
    bundles_dir: Path | None = None,
    variant: str | None = None,
) -> tuple[Path, dict]:
    """The bundle's inference.json on one pair; returns its ITK-convention field and the measurements.

    ``seconds`` is the registration's time when the bundle prints it (``<case>: T s (network N s, IO M s)``: the
    network's forward pass plus the instance optimisation), else the case's; ``io_seconds`` the instance
    optimisation's share; ``case_seconds`` the whole case (network, IO, warping, writing); ``process_seconds`` the
    whole process. `bundles_dir` holds the bundles (default: this checkout's; a baseline release's for the
    before/after rows); `variant` names inference.json overrides in ``VARIANTS``.

    Raises:
        RuntimeError: the run failed (its last output lines in the message) or wrote no field.
    """
    bundle_root = (bundles_dir or ROOT / "bundles") / bundle
    out = work / "out"
    overrides = {"moving_image": item["moving_image"], "fixed_image": item["fixed_image"], **VARIANTS.get(variant, {})}
    cmd = bundle_run_command(str(bundle_root / "configs" / "inference.json"), bundle_root, out, overrides)
    m = run_measured(cmd, env=thread_env(threads))
    if m.returncode != 0:
        raise RuntimeError(f"{bundle} failed with exit code {m.returncode}:\n{m.tail()}")
    fields = sorted(out.rglob("*_ddf_itk.nii.gz"))
    if len(fields) != 1:
        raise RuntimeError(f"{bundle} wrote {len(fields)} ITK-convention fields in {out}, expected 1")
    times = re.findall(r"^\S+: ([0-9.]+) s(?: \(network ([0-9.]+) s(?:, IO ([0-9.]+) s)?\))?$", m.stdout, flags=re.M)
    case = float(times[-1][0]) if times else m.seconds
    network = float(times[-1][1]) if times and times[-1][1] else case
    io_seconds = float(times[-1][2]) if times and times[-1][2] else 0.0
    measured = {
        "seconds": network + io_seconds,
        "io_seconds": io_seconds,
        "case_seconds": case,
        "process_seconds": m.seconds,
        "peak_rss_gb": m.peak_rss_gb,
    }
    return fields[0], measured


def run_peer_method(method: str, item: dict, work: Path, threads: int) -> tuple[Path, dict]:
    """One classical peer on one pair in the peers venv; returns its field file and the measurements.

    Raises:
        RuntimeError: the peer failed (its last output lines in the message).
    """
    field = work / "field.nii.gz"
    python, reason = peer_python(method)
    if python is None:
        raise RuntimeError(f"{method} cannot run: {reason}")
    cmd = [python, str(RUN_PEER), method, "--fixed", item["fixed_image"], "--moving", item["moving_image"]]
    m = run_measured([*cmd, "--out", str(field)], env=thread_env(threads))
    if m.returncode != 0 or not field.is_file():
        raise RuntimeError(f"{method} failed with exit code {m.returncode}:\n{m.tail()}")
    seconds = json.loads(m.stdout.strip().splitlines()[-1])["seconds"]
    return field, {"seconds": seconds, "process_seconds": m.seconds, "peak_rss_gb": m.peak_rss_gb}


# ------------------------------------------------------------------------------------------------ baseline
def export_bundles(revision: str, folder: Path) -> Path:
    """The ``bundles/`` folder of git `revision` of this repository, written under `folder`; returns its path.

    The before/after rows (``--baseline``) run the previous release exactly as it was, with its own code and weights.

    Raises:
        SystemExit: `revision` is not a commit of this repository (or git is missing).
    """
    import subprocess
    import tarfile

    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "bundles"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        message = getattr(exc, "stderr", b"") or str(exc).encode()
        raise SystemExit(f"error: --baseline {revision}: {message.decode(errors='replace').strip()}") from None
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "bundles"


def split_method(method: str) -> tuple[str, str | None]:
    """``"refdrn@ce82f87"`` -> ``("refdrn", "ce82f87")``; a method without ``@`` has no revision. A variant
    (``"refdrn:network"``) stays in the name; see :func:`split_variant`."""
    name, _, revision = method.partition("@")
    return name, revision or None


def split_variant(name: str) -> tuple[str, str | None]:
    """``"refdrn:network"`` -> ``("refdrn", "network")``; a name without ``:`` has no variant.

    Raises:
        SystemExit: an unknown variant (the message lists ``VARIANTS``).
    """
    bundle, _, variant = name.partition(":")
    if variant and variant not in VARIANTS:
        raise SystemExit(f"error: unknown variant {variant!r} of {bundle}; choose from {sorted(VARIANTS)}")
    return bundle, variant or None


# ------------------------------------------------------------------------------------------------ data
def load_pairs(datalist: Path, dataset_dir: Path, section: str, keys: tuple[str, ...]) -> list[dict]:
    """The items of one datalist section with absolute paths under `keys`, and a name each.

    Raises:
        SystemExit: the datalist, the section, a key or a file is missing.
    """
    if not datalist.is_file():
        raise SystemExit(f"error: {datalist}: no such datalist")
    content = json.loads(datalist.read_text())
    if section not in content:
        raise SystemExit(f"error: {datalist} has no {section!r} section (it has {sorted(content)})")
    items = []
    for k, entry in enumerate(content[section]):
        item = dict(entry)
        for key in keys:
            if key not in item:
                raise SystemExit(f"error: {datalist} [{section}][{k}] has no {key!r}")
            path = Path(item[key]) if Path(item[key]).is_absolute() else dataset_dir / item[key]
            if not path.is_file():
                raise SystemExit(f"error: {path} ({key} of {datalist} [{section}][{k}]): no such file")
            item[key] = str(path)
        stem = Path(item[keys[0]]).name.split(".")[0]
        item["name"] = str(entry.get("name", stem))
        items.append(item)
    return items


# ------------------------------------------------------------------------------------------------ reports
def summarise(rows: list[dict], methods: list[str], metrics: list[str], reference: str) -> dict:
    """``{method: {metric: (mean, std, n)}}`` over the rows of each method (NaN and inf left out)."""
    out = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        out[method] = {}
        for metric in metrics:
            values = np.array([r.get(metric, np.nan) for r in mine], float)
            values = values[np.isfinite(values)]
            out[method][metric] = (
                float(values.mean()) if values.size else float("nan"),
                float(values.std()) if values.size else float("nan"),
                int(values.size),
            )
    return out


def _cell(mean: float, std: float, digits: int) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) and std > 0 else "")


def summary_markdown(
    summary: dict, methods: list[str], columns: list[tuple], reference: str, header: str, time_key: str = "seconds"
) -> str:
    """The summary table: a row per method; `time_key` and peak RSS also as ratios to `reference`."""
    lines = [header, ""]
    names = [c[1] for c in columns] + [f"time / {reference}", f"peak RSS / {reference}"]
    lines.append("| method | " + " | ".join(names) + " |")
    lines.append("|---" * (len(names) + 1) + "|")
    ref = summary.get(reference)
    for method in methods:
        s = summary[method]
        cells = [_cell(*s[key][:2], digits) for key, _, digits in columns]
        for key in (time_key, "peak_rss_gb"):
            if ref and math.isfinite(ref[key][0]) and ref[key][0] > 0 and math.isfinite(s[key][0]):
                cells.append(f"{s[key][0] / ref[key][0]:.2f}")
            else:
                cells.append("n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def before_after(summary: dict, methods: list[str], quality: tuple[str, ...], time_key: str) -> str:
    """One line per baseline method (``<method>@<rev>``): its `time_key`, peak RSS and `quality` metrics against
    this checkout's ``<method>``, as a markdown list."""
    lines = []
    for method in methods:
        name, revision = split_method(method)
        if revision is None or name not in summary or method not in summary:
            continue
        now, then = summary[name], summary[method]
        parts = []
        if then[time_key][0] > 0 and now[time_key][0] > 0:
            parts.append(
                f"time {then[time_key][0]:.1f} → {now[time_key][0]:.1f} s "
                f"({then[time_key][0] / now[time_key][0]:.1f}× faster)"
            )
        parts.append(f"peak RSS {then['peak_rss_gb'][0]:.2f} → {now['peak_rss_gb'][0]:.2f} GB")
        parts += [f"{q} {then[q][0]:.4f} → {now[q][0]:.4f}" for q in quality if q in now and q in then]
        lines.append(f"- {name}, before ({revision}) → after: " + "; ".join(parts) + ".")
    return ("\n" + "\n".join(lines) + "\n") if lines else ""


def write_csv(rows: list[dict], path: Path) -> None:
    """`rows` as a CSV (the union of their keys as columns), written atomically."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(buffer.getvalue(), path)


def plot(rows: list[dict], methods: list[str], quality: str, quality_name: str, title: str, path: Path) -> None:
    """Box plot of `quality` per method (each case a dot) beside the time per method on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if any(r["method"] == m for r in rows)]
    fig, (ax_q, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    values = [[r[quality] for r in rows if r["method"] == m and math.isfinite(r.get(quality, np.nan))] for m in shown]
    ax_q.boxplot(values, tick_labels=shown, showmeans=True)
    for k, v in enumerate(values):
        ax_q.scatter(np.full(len(v), k + 1) + np.linspace(-0.08, 0.08, len(v)), v, s=14, color="tab:blue", zorder=3)
    case_key = "pair" if rows and "pair" in rows[0] else "volume"
    for case in dict.fromkeys(r[case_key] for r in rows):  # one grey line per case: the paired comparison
        ys = [next((r[quality] for r in rows if r["method"] == m and r[case_key] == case), np.nan) for m in shown]
        ax_q.plot(range(1, len(shown) + 1), ys, "-", color="0.6", linewidth=0.8, zorder=2)
    ax_q.set_ylabel(quality_name)
    ax_q.set_title(f"{quality_name} per method (box: quartiles, triangle: mean, grey: one case)", fontsize=10)
    ax_q.grid(axis="y", alpha=0.3)
    time_key = "process_seconds" if quality.startswith(("psnr", "ssim")) else "seconds"
    times = [[r[time_key] for r in rows if r["method"] == m and r.get(time_key, 0) > 0] for m in shown]
    timed = [(m, t) for m, t in zip(shown, times) if t]
    if timed:
        ax_t.barh(
            [m for m, _ in timed],
            [np.mean(t) for _, t in timed],
            xerr=[np.std(t) for _, t in timed],
            color="tab:orange",
        )
        ax_t.set_xscale("log")
        # bars start at the decade below the fastest method, so their lengths compare on the log axis
        ax_t.set_xlim(left=10 ** math.floor(math.log10(min(np.mean(t) for _, t in timed))))
        for k, (_, t) in enumerate(timed):
            ax_t.text(np.mean(t), k, f"  {np.mean(t):.1f} s", va="center", fontsize=9)
        ax_t.invert_yaxis()
    ax_t.set_xlabel(
        ("whole process" if time_key == "process_seconds" else "registration") + " wall time (s, log scale)"
    )
    ax_t.set_title("time per method (mean ± std)", fontsize=10)
    ax_t.grid(axis="x", alpha=0.3, which="both")
    for ax in (ax_q,):
        plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


# ------------------------------------------------------------------------------------------------ runs
def benchmark_registration(args, bundle: str, out_dir: Path) -> tuple[list[dict], list[str], str]:
    """Run every method on every pair; returns the rows, the methods and the summary's markdown."""
    import nibabel as nib

    keys = ("moving_image", "fixed_image", "moving_label", "fixed_label")
    pairs = load_pairs(args.datalist, args.dataset_dir, args.section, keys)[: args.max_pairs]
    methods = list(args.methods or DEFAULTS[bundle]["methods"])
    if args.baseline and bundle in methods:
        methods.insert(methods.index(bundle) + 1, f"{bundle}@{args.baseline}")
    unknown = [
        m for m in methods if split_variant(split_method(m)[0])[0] not in ("identity", *REGISTRATION_BUNDLES, *PEERS)
    ]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from identity, {REGISTRATION_BUNDLES}, {PEERS}")
    for method in [m for m in methods if m in PEERS]:
        python, reason = peer_python(method)
        if python is None:
            print(f"skipping {method}: {reason}")
            methods.remove(method)
    print(f"{len(pairs)} pair(s) of {args.datalist}, methods {methods}, {args.threads} thread(s) per method")
    rows, per_label_rows = [], []
    for pair in pairs:
        fixed_label = nib.load(pair["fixed_label"])
        affine, shape = fixed_label.affine, fixed_label.shape[:3]
        fixed_ids = np.asarray(fixed_label.dataobj).astype(np.int64)
        moving_ids = labels_on_grid(nib.load(pair["moving_label"]), affine, shape)
        peer_dir = tempfile.TemporaryDirectory(prefix="bench_pair_")
        peer_pair = upsampled_pair(pair, Path(peer_dir.name)) if args.peer_grid == "label" else pair
        for method in methods:
            with tempfile.TemporaryDirectory(prefix=f"bench_{method}_") as tmp:
                if method == "identity":
                    ddf, measured = np.zeros((3, *shape), np.float32), {}
                else:
                    name, revision = split_method(method)
                    name, variant = split_variant(name)
                    try:
                        if name in REGISTRATION_BUNDLES:
                            baseline = args.baseline_bundles if revision else None
                            field, measured = run_bundle_method(name, pair, Path(tmp), args.threads, baseline, variant)
                        else:
                            field, measured = run_peer_method(method, peer_pair, Path(tmp), args.threads)
                    except RuntimeError as exc:
                        raise SystemExit(f"error: {pair['name']}: {exc}") from None
                    ddf = itk_field_to_ddf(nib.load(str(field)), affine, shape)
            metrics, per_label = registration_metrics(ddf, moving_ids, fixed_ids, affine)
            row = {"pair": pair["name"], "method": method, **metrics, **measured, "threads": args.threads}
            rows.append(row)
            per_label_rows += [
                {"pair": pair["name"], "method": method, "label": k, "dice": v} for k, v in per_label.items()
            ]
            timing = f", {measured['seconds']:.1f} s, {measured['peak_rss_gb']:.2f} GB" if measured else ""
            print(
                f"{pair['name']} {method}: Dice {metrics['dice']:.4f}, HD95 {metrics['hd95']:.2f} mm, "
                f"folding {metrics['folding']:.3f} %, SDlogJ {metrics['sdlogj']:.3f}{timing}",
                flush=True,
            )
        peer_dir.cleanup()
    write_csv(per_label_rows, out_dir / "dice_per_label.csv")
    columns = [
        ("dice", "Dice", 4),
        ("hd95", "HD95 (mm)", 2),
        ("asd", "ASD (mm)", 2),
        ("folding", "folding (%)", 3),
        ("sdlogj", "SDlogJ", 3),
        ("seconds", "time (s)", 1),
        ("io_seconds", "IO (s)", 1),
        ("case_seconds", "case (s)", 1),
        ("process_seconds", "process (s)", 1),
        ("peak_rss_gb", "peak RSS (GB)", 2),
    ]
    summary = summarise(rows, methods, [c[0] for c in columns], REFERENCE["registration"])
    header = (
        f"{len(pairs)} pair(s) of `{args.datalist_text}`, {args.threads} thread(s) per method, CPU; mean ± std over "
        "the pairs; time: the registration (the bundles: the network's forward pass plus the instance optimisation, "
        "as they print it; elastix and ANTs: registration and field; reading and writing files excluded), the base "
        "of the time ratios; IO: the instance optimisation's share; `:network`: `--io_iterations 0`, the network's "
        "field alone; `:io_from_identity`: `--io_init identity`, IO from zero displacement (its time includes the "
        "discarded network pass); case: the bundle's whole case (network, IO, warping, writing its files); process: "
        "the whole process (start-up included); "
        f"produced by `{args.command}`."
    )
    table = summary_markdown(summary, methods, columns, REFERENCE["registration"], header)
    table += before_after(summary, methods, ("dice", "folding", "sdlogj"), "case_seconds")
    plot(rows, methods, "dice", "mean Dice", f"{bundle} benchmark: {len(pairs)} pair(s)", out_dir / "benchmark.png")
    return rows, methods, table


def parse_scale(text: str) -> float | list[float]:
    """``"4"`` -> 4.0 (isotropic); ``"1x1x4"`` -> [1.0, 1.0, 4.0] (per RAS axis: thick slices)."""
    parts = str(text).lower().split("x")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a scale is a number (4) or one per axis (1x1x4), got {text!r}") from None
    if len(values) not in (1, 3) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a scale is a number >= 1 (4) or three (1x1x4), got {text!r}")
    return values[0] if len(values) == 1 else values


def scale_text(scale: float | list[float]) -> str:
    """×4 or 1×1×4 (a table header)."""
    return f"×{scale:g}" if isinstance(scale, float) else "×".join(f"{s:g}" for s in scale)


def eclare_method(args, scale: list[float], run_dir: Path) -> tuple[dict, float, float]:
    """ECLARE on each test volume's thick-slice LR input, scored as rem_sr's evaluate.json scores its methods.

    The HR reference, brain mask and LR input come from rem_sr's own evaluate.json pipeline (the same intensity
    normalisation and degradation as every other method); the LR volume is written with its thick-slice affine,
    ECLARE (``.venv-eclare``) runs on it in a measured process with ``--relative-slice-thickness 1`` and the
    Gaussian profile (the true slice profile, so its own profile estimation is skipped), and its output, on the HR
    grid, is clipped to [0, 1] and scored with the bundle's metric classes. Returns the mean metrics, the summed
    process seconds and the largest peak RSS.

    Raises:
        SystemExit: ECLARE fails or writes no volume on the HR grid.
    """
    import nibabel as nib
    import torch

    from tools.compare_methods import config_files

    bundle_root = ROOT / "bundles" / "rem_sr"
    degradation = bundle_scripts(bundle_root, "degradation")
    evaluate = bundle_scripts(bundle_root, "evaluate")
    from monai.bundle import ConfigParser
    from monai.metrics import PSNRMetric, SSIMMetric

    parser = ConfigParser()
    parser.read_config(config_files(bundle_root))
    parser.update(
        {
            "bundle_root": str(bundle_root),
            "datalist": str(args.datalist),
            "dataset_dir": str(args.dataset_dir),
            "method": "trilinear",
            "eval_scale": scale,
        }
    )
    dataset = parser.get_parsed_content("evaluate#dataset")
    metrics = {
        "psnr_brain": evaluate.MaskedPSNRMetric(max_val=1.0),
        "ssim_brain": evaluate.MaskedSSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5),
        "psnr": PSNRMetric(max_val=1.0),
        "ssim": SSIMMetric(spatial_dims=3, data_range=1.0, win_size=11, kernel_sigma=1.5),
    }
    seconds, peak = 0.0, 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        item = dataset[index]
        hr = item["label"]
        affine = np.asarray(hr.affine, dtype=float)
        lr = degradation.downsample(hr.as_tensor(), scale, "gaussian")[0].numpy()
        to_hr_index = np.diag([*scale, 1.0])
        to_hr_index[:3, 3] = (np.asarray(scale) - 1) / 2
        lr_path = run_dir / f"case{index}_lr.nii.gz"
        nib.save(nib.Nifti1Image(lr.astype(np.float32), affine @ to_hr_index), str(lr_path))
        cmd = [str(ECLARE), "--in-fpath", str(lr_path), "--out-dir", str(run_dir), "--n-patches"]
        cmd += [
            str(args.eclare_patches),
            "--relative-slice-thickness",
            "1.0",
            "--relative-slice-profile-type",
            "gaussian",
        ]
        m = run_measured(cmd, env=thread_env(args.threads))
        if m.returncode != 0:
            raise SystemExit(f"{m.tail()}\nerror: ECLARE failed with exit code {m.returncode}")
        seconds, peak = seconds + m.seconds, max(peak, m.peak_rss_gb)
        out = np.asarray(nib.load(str(run_dir / f"case{index}_lr_eclare.nii.gz")).dataobj, dtype=np.float32)
        if out.shape != tuple(hr.shape[1:]):
            raise SystemExit(f"error: ECLARE wrote a {out.shape} volume, the HR grid is {tuple(hr.shape[1:])}")
        pred = torch.from_numpy(out).clamp(0, 1)[None, None]
        label = hr.as_tensor()[None].float()
        label_mask = torch.cat([label, item["mask"].as_tensor()[None].float()], 1) if "mask" in item else label
        for name, metric in metrics.items():
            metric(pred, label_mask if name.endswith("_brain") else label)
    means = {name: float(torch.nanmean(metric.aggregate().float().reshape(-1))) for name, metric in metrics.items()}
    return means, seconds, peak


def benchmark_sr(args, out_dir: Path) -> tuple[list[dict], list[str], str]:
    """rem_sr's evaluate.json once per method, each in its own measured process; rows, methods, markdown."""
    from tools.compare_methods import config_files, read_metrics

    thick = isinstance(args.scale, list)
    # REM (the weights for the input's kind, as inference picks them) and the one model trained on every kind
    extra = ["rem_general", "eclare"] if thick else ["rem_general"]
    methods = list(args.methods or DEFAULTS["rem_sr"]["methods"] + extra)
    if args.baseline and "rem" in methods and thick:
        # releases before rem_sr 0.4.0 evaluate isotropic factors only: a thick-slice baseline row cannot be made
        print(f"rem@{args.baseline} skipped: a baseline runs at isotropic scales only (--scale 4)")
    elif args.baseline and "rem" in methods:
        methods.insert(methods.index("rem") + 1, f"rem@{args.baseline}")
    if "eclare" in methods and (not thick or not ECLARE.is_file()):
        reason = "it needs thick-slice input (--scale 1x1x4)" if not thick else f"{ECLARE} is absent (make eclare-venv)"
        print(f"eclare skipped: {reason}")
        methods.remove("eclare")
    rows = []
    label = scale_text(args.scale)
    print(f"rem_sr {label} on the test section of {args.datalist}, methods {methods}, {args.threads} thread(s)")
    for method in methods:
        run_dir = out_dir / "runs" / method
        if method == "eclare":
            metrics, seconds, peak = eclare_method(args, args.scale, run_dir)
            row = {"volume": "test", "method": method, **metrics, "seconds": float("nan")}
            row.update({"process_seconds": seconds, "peak_rss_gb": peak, "threads": args.threads})
            rows.append(row)
            print(f"{method}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
            continue
        name, revision = split_method(method)
        bundle_root = (args.baseline_bundles if revision else ROOT / "bundles") / "rem_sr"
        scale = args.scale if thick else (int(args.scale) if float(args.scale).is_integer() else args.scale)
        overrides = {"method": name, "eval_scale": scale, "dataset_dir": str(args.dataset_dir)}
        overrides["datalist"] = str(args.datalist)
        cmd = bundle_run_command(config_files(bundle_root), bundle_root, run_dir, overrides)
        m = run_measured(cmd, env=thread_env(args.threads))
        if m.returncode != 0:
            raise SystemExit(f"{m.tail()}\nerror: rem_sr {method} failed with exit code {m.returncode}")
        metrics = {k: v["mean"] for k, v in read_metrics(run_dir).items()}
        row = {"volume": "test", "method": method, **metrics}
        row.update({"process_seconds": m.seconds, "peak_rss_gb": m.peak_rss_gb, "threads": args.threads})
        rows.append(row)
        print(f"{method}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)), flush=True)
    metric_names = [k for k in rows[0] if k not in ("volume", "method", "threads", "process_seconds", "peak_rss_gb")]
    columns = [(k, k, 2 if "psnr" in k else 4) for k in metric_names if k != "seconds"]
    columns += [
        ("seconds", "network (s)", 1),
        ("process_seconds", "process (s)", 1),
        ("peak_rss_gb", "peak RSS (GB)", 2),
    ]
    summary = summarise(rows, methods, [c[0] for c in columns], REFERENCE["sr"])
    header = (
        f"rem_sr {label}, test section of `{args.datalist_text}`, {args.threads} thread(s), CPU; PSNR in dB; "
        "network: REM's forward pass (rem_sr's ForwardTimer; the interpolators have none); process: the whole "
        "evaluation process (loading, degradation, the method, metrics), the base of the time ratios"
        + (
            f"; eclare: ECLARE with {args.eclare_patches} training patches (a reduced budget; its default is "
            "1,000,000), its process time = training on the volume + inference"
            if "eclare" in methods
            else ""
        )
        + f"; produced by `{args.command}`."
    )
    table = summary_markdown(summary, methods, columns, REFERENCE["sr"], header, time_key="process_seconds")
    table += before_after(summary, methods, ("psnr_brain", "ssim_brain", "psnr"), "seconds")
    quality = "psnr_brain" if "psnr_brain" in metric_names else metric_names[0]
    plot(rows, methods, quality, f"{quality} (dB)", f"rem_sr {label}", out_dir / "benchmark.png")
    return rows, methods, table


def fill_cards(bundle: str, table: str, marker: str | None = None) -> list[Path]:
    """Paste a summary table into the bundle's model card and the README (``<!-- benchmark:<bundle>:start -->`` ...
    ``<!-- benchmark:<bundle>:end -->`` in each); returns the files written.

    Raises:
        SystemExit: a file lacks the markers.
    """
    from tools.fill_model_card import fill

    marker = marker or bundle
    markers = (f"<!-- benchmark:{marker}:start -->", f"<!-- benchmark:{marker}:end -->")
    written = []
    for path in (ROOT / "bundles" / bundle / "docs" / "README.md", ROOT / "README.md"):
        atomic_write_text(fill(path.read_text(), table, *markers), path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", choices=("rem_sr", *REGISTRATION_BUNDLES))
    parser.add_argument("--datalist", type=Path, help="default: the bundle's test datalist under data/")
    parser.add_argument("--dataset_dir", type=Path, help="default: the datalist's folder")
    parser.add_argument("--section", default="test")
    parser.add_argument("--methods", nargs="+", help="default: every method of the bundle's benchmark")
    parser.add_argument("--threads", type=int, default=2, help="threads of every method (default 2)")
    parser.add_argument("--max_pairs", type=int, default=None, help="only the first N pairs")
    parser.add_argument(
        "--peer_grid",
        choices=("label", "image"),
        default="label",
        help="the peers' inputs: each image resampled onto its label's grid (trilinear ↓↑, default; the bundles also "
        "register on the upsampled grid) or the image files as given",
    )
    parser.add_argument(
        "--scale",
        type=parse_scale,
        default=4.0,
        help="rem_sr: the SR factor (default 4), or one per RAS axis for thick slices (1x1x4: 4 mm axial slices)",
    )
    parser.add_argument(
        "--eclare_patches",
        type=int,
        default=10000,
        help="rem_sr on thick slices: ECLARE's training patches (default 10000, a reduced budget; ECLARE's own is 1e6)",
    )
    parser.add_argument(
        "--baseline",
        help="a git revision of this repository (the previous release): its bundle, with its own code and weights, "
        "runs as one more method (<bundle>@<revision>) and a before → after line follows the table",
    )
    parser.add_argument("--output_dir", type=Path, help="default: outputs/benchmark/<bundle>")
    parser.add_argument(
        "--card", action="store_true", help="also paste the summary into the bundle's model card and the README"
    )
    args = parser.parse_args(argv)
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--card"]
    args.command = "python tools/benchmark.py " + " ".join(given)
    datalist = args.datalist or ROOT / DEFAULTS[args.bundle]["datalist"]
    args.datalist_text = str(args.datalist or DEFAULTS[args.bundle]["datalist"])
    args.datalist = datalist.resolve()
    args.dataset_dir = (args.dataset_dir or args.datalist.parent).resolve()
    # one folder and one card table per SR input kind: rem_sr (x4, x2 ...) and rem_sr_1x1x4 (thick slices)
    key = args.bundle if not isinstance(args.scale, list) else f"{args.bundle}_{'x'.join(f'{s:g}' for s in args.scale)}"
    out_dir = (args.output_dir or ROOT / "outputs" / "benchmark" / key).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    baseline_dir = tempfile.TemporaryDirectory(prefix="bench_baseline_") if args.baseline else None
    args.baseline_bundles = export_bundles(args.baseline, Path(baseline_dir.name)) if baseline_dir else None
    if args.bundle == "rem_sr":
        rows, methods, table = benchmark_sr(args, out_dir)
    else:
        rows, methods, table = benchmark_registration(args, args.bundle, out_dir)
    write_csv(rows, out_dir / "results.csv")
    atomic_write_text(table, out_dir / "summary.md")
    print("\n" + table)
    print(f"wrote {out_dir / 'results.csv'}, summary.md and benchmark.png")
    if args.card:
        for path in fill_cards(args.bundle, table, key):
            print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
