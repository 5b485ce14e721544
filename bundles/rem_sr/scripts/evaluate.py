"""Evaluation of REM against interpolation baselines (evaluate.json).

For each HR test volume and each scale, the HR volume is degraded with the training degradation
model, then upsampled back with nearest neighbour, trilinear and cubic B-spline interpolation, and
with REM (trilinear + REM through the sliding-window inferer). PSNR and SSIM (MONAI metrics, 3D,
data range 1) are computed over the whole volume and inside the brain mask. All predictions are
clipped to the HR intensity range [0, 1] before scoring, the same way for every method.

Outputs in `output_dir`: metrics.csv (one row per case, scale and method), summary.json (mean and
std per scale and method, plus REM's gain over each baseline) and a Fig. 4-style PNG.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from monai.inferers import Inferer
from monai.metrics import PSNRMetric, SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from monai.transforms import EnsureChannelFirst, LoadImage
from tqdm import tqdm

from .checks import load_checked_weights
from .degradation import downsample, upsample

METHOD_LABELS = {"nearest": "NN", "trilinear": "Trilinear", "bspline": "B-spline", "rem": "REM"}
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".partial-{path.name}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def masked_psnr(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> float:
    metric = PSNRMetric(max_val=1.0)
    if mask is None:
        return float(metric(pred[None], target[None]).item())
    sel = mask > 0
    return float(metric(pred[sel].reshape(1, 1, -1), target[sel].reshape(1, 1, -1)).item())


def masked_ssim(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> float:
    if mask is None:
        metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=SSIM_WINDOW, kernel_sigma=SSIM_SIGMA)
        return float(metric(pred[None], target[None]).item())
    ssim_map, _ = compute_ssim_and_cs(pred[None], target[None], spatial_dims=3, kernel_size=[SSIM_WINDOW] * 3,
                                      kernel_sigma=[SSIM_SIGMA] * 3, data_range=1.0)
    # the SSIM map is computed on "valid" windows only: crop the mask the same way
    half = SSIM_WINDOW // 2
    inner = mask[(slice(None),) + (slice(half, -half),) * 3] > 0
    return float(ssim_map[0][inner].mean().item())


class SREvaluation:
    def __init__(self, network: torch.nn.Module, inferer: Inferer, items: list[dict], output_dir: str,
                 ckpt_path: str | None = None, scales=(2, 4), device: str | torch.device = "cpu",
                 amp: bool = False, figure_scales=(2, 4), figure_name: str = "sr_comparison.png") -> None:
        self.network = network
        self.inferer = inferer
        self.items = items
        self.output_dir = Path(output_dir)
        self.ckpt_path = ckpt_path
        self.scales = [float(s) for s in scales]
        self.device = torch.device(device)
        self.amp = amp and self.device.type == "cuda"
        self.figure_scales = [float(s) for s in figure_scales]
        self.figure_name = figure_name
        self.loader = LoadImage(image_only=True)
        self.channel_first = EnsureChannelFirst()

    def load(self, path: str) -> torch.Tensor:
        return self.channel_first(self.loader(path)).as_tensor().float()

    @torch.no_grad()
    def super_resolve(self, trilinear: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, enabled=self.amp):
            out = self.inferer(trilinear[None].to(self.device), self.network)
        return out[0].float().cpu()

    def predictions(self, hr: torch.Tensor, scale: float) -> tuple[dict[str, torch.Tensor], float]:
        lr = downsample(hr, scale)
        preds = {m: upsample(lr, hr.shape[1:], m) for m in ("nearest", "trilinear", "bspline")}
        start = time.perf_counter()
        preds["rem"] = self.super_resolve(preds["trilinear"])
        seconds = time.perf_counter() - start
        return {k: v.clamp(0.0, 1.0) for k, v in preds.items()}, seconds

    def run(self) -> dict:
        if self.ckpt_path is not None:
            load_checked_weights(self.ckpt_path, self.network)
        self.network.eval()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows, figure_data = [], {}
        jobs = [(item, s) for item in self.items for s in self.scales]
        hr_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        for item, scale in tqdm(jobs, desc="evaluating", unit="case x scale"):
            if item["image"] not in hr_cache:
                hr_cache.clear()
                mask = self.load(item["mask"]) if item.get("mask") else None
                hr_cache[item["image"]] = (self.load(item["image"]), mask)
            hr, mask = hr_cache[item["image"]]
            case = item.get("name") or Path(item["image"]).name.split(".")[0]
            preds, rem_seconds = self.predictions(hr, scale)
            for method, pred in preds.items():
                rows.append({
                    "case": case, "scale": f"{scale:g}", "method": method,
                    "psnr": masked_psnr(pred, hr, None), "ssim": masked_ssim(pred, hr, None),
                    "psnr_brain": masked_psnr(pred, hr, mask) if mask is not None else float("nan"),
                    "ssim_brain": masked_ssim(pred, hr, mask) if mask is not None else float("nan"),
                    "seconds": rem_seconds if method == "rem" else float("nan"),
                })
            if not figure_data or figure_data.get("case") == case:
                figure_data["case"] = case
                figure_data["hr"] = hr
                figure_data[scale] = (preds, [r for r in rows if r["case"] == case and r["scale"] == f"{scale:g}"])
        summary = self.summarize(rows)
        self.write_csv(rows)
        _atomic_write_bytes(self.output_dir / "summary.json", json.dumps(summary, indent=2).encode())
        self.write_figure(figure_data)
        table = self.markdown_table(summary)
        _atomic_write_bytes(self.output_dir / "results.md", table.encode())
        print("\n" + table)
        print(f"wrote {self.output_dir / 'metrics.csv'}, summary.json, results.md and {self.figure_name}")
        return summary

    def summarize(self, rows: list[dict]) -> dict:
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        for r in rows:
            groups[(r["scale"], r["method"])].append(r)
        metrics = ("psnr", "ssim", "psnr_brain", "ssim_brain", "seconds")
        summary: dict = {"cases": sorted({r["case"] for r in rows}), "per_scale": {}}
        for (scale, method), rs in groups.items():
            entry = {}
            for m in metrics:
                values = np.array([r[m] for r in rs], dtype=float)
                values = values[np.isfinite(values)]
                if values.size:
                    entry[m] = {"mean": float(values.mean()), "std": float(values.std())}
            summary["per_scale"].setdefault(f"x{scale}", {})[method] = entry
        for scale, methods in summary["per_scale"].items():
            if "rem" in methods:
                gains = {}
                for base in ("nearest", "trilinear", "bspline"):
                    if base in methods:
                        gains[f"rem_minus_{base}"] = {m: methods["rem"][m]["mean"] - methods[base][m]["mean"]
                                                      for m in ("psnr", "psnr_brain") if m in methods[base]}
                methods["gains_db"] = gains
        return summary

    def write_csv(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
        _atomic_write_bytes(self.output_dir / "metrics.csv", buffer.getvalue().encode())

    def markdown_table(self, summary: dict) -> str:
        """Mean (std over cases) per scale and method, in the layout of the model card."""
        def cell(entry: dict, metric: str, digits: int) -> str:
            if metric not in entry:
                return "n/a"
            m = entry[metric]
            return f"{m['mean']:.{digits}f} ± {m['std']:.{digits}f}" if len(summary["cases"]) > 1 else f"{m['mean']:.{digits}f}"

        lines = [f"Cases: {', '.join(summary['cases'])}", "",
                 "| scale | method | PSNR brain (dB) | SSIM brain | PSNR volume (dB) | SSIM volume |",
                 "|---|---|---|---|---|---|"]
        for scale, methods in summary["per_scale"].items():
            for method, label in METHOD_LABELS.items():
                if method in methods:
                    e = methods[method]
                    lines.append(f"| {scale} | {label} | {cell(e, 'psnr_brain', 2)} | {cell(e, 'ssim_brain', 4)} | "
                                 f"{cell(e, 'psnr', 2)} | {cell(e, 'ssim', 4)} |")
        lines.append("")
        for scale, methods in summary["per_scale"].items():
            gains = methods.get("gains_db", {})
            parts = [f"{base.replace('rem_minus_', '')} {g['psnr_brain']:+.2f} dB (brain) / {g['psnr']:+.2f} dB (volume)"
                     for base, g in gains.items() if "psnr_brain" in g]
            if parts:
                lines.append(f"- {scale}: REM vs " + "; vs ".join(parts))
        return "\n".join(lines) + "\n"

    def write_figure(self, data: dict) -> None:
        """Axial, coronal and sagittal views of GT, NN, trilinear and REM per scale (the paper's Fig. 4)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        scales = [s for s in self.figure_scales if s in data]
        if not scales:
            return
        hr = data["hr"][0].numpy()
        columns = [("GT", hr, None)]
        for s in scales:
            preds, rows = data[s]
            by_method = {r["method"]: r for r in rows}
            for method in ("nearest", "trilinear", "rem"):
                r = by_method[method]
                columns.append((f"{METHOD_LABELS[method]} x{s:g}\n{r['psnr_brain']:.2f} dB / {r['ssim_brain']:.4f}",
                                preds[method][0].numpy(), method))
        centre = [n // 2 for n in hr.shape]
        views = [("axial", lambda v: np.rot90(v[:, :, centre[2]])),
                 ("coronal", lambda v: np.rot90(v[:, centre[1], :])),
                 ("sagittal", lambda v: np.rot90(v[centre[0], :, :]))]
        fig, axes = plt.subplots(len(views), len(columns), figsize=(2.2 * len(columns), 2.6 * len(views)),
                                 squeeze=False)
        for row, (view_name, take) in enumerate(views):
            for col, (title, volume, _) in enumerate(columns):
                ax = axes[row][col]
                ax.imshow(take(volume), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if row == 0:
                    ax.set_title(title, fontsize=8)
                if col == 0:
                    ax.set_ylabel(view_name, fontsize=9)
        fig.suptitle(f"{data['case']}: PSNR / SSIM inside the brain mask", fontsize=10)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        _atomic_write_bytes(self.output_dir / self.figure_name, buffer.getvalue())
