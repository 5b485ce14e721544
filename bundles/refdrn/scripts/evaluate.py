"""Evaluation of the cascade against its baselines, in the layout of the paper's Table III (evaluate.json).

Rows (methods), all on the same held-out pairs, LR inputs degraded down-up by `scale`:
- ``identity``: no registration (the "Affine" column: the sample pairs are already affinely aligned);
- ``backbone_lr``: the plain backbone on trilinear-upsampled LR input (FDRN↓↑ / VoxelMorph↓↑), its own weights;
- ``cascade``: REM + backbone (ReFDRN↓↑ / ReVoxelMorph↓↑), models/model.pt;
- ``cascade_no_aux``: the cascade trained with lambda_aux = 0 (Table IV's "w/o AL"), its own weights.
A row whose weights file does not exist is reported as "not trained" rather than silently skipped.

Per pair and method: mean label Dice of the warped moving label (nearest neighbour), global NCC between the
warped HR moving image and the HR fixed image (the same images for every row, so NCC is comparable), the
percentage of voxels with a non-positive Jacobian determinant, PSNR/SSIM of the network's input images
(REM output or trilinear) against HR, and the forward-pass runtime.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric
from monai.networks.blocks import Warp
from monai.transforms import EnsureChannelFirst, LoadImage
from tqdm import tqdm

from .checks import BundleInputError
from .data import degrade
from .metrics import folding_percent, global_ncc, mean_label_dice
from .networks import build_registration_network

METHODS = {
    "identity": "Identity",
    "backbone_lr": "Backbone↓↑",
    "cascade": "Cascade (REM + backbone)↓↑",
    "cascade_no_aux": "Cascade w/o L_aux↓↑",
}


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".partial-{path.name}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


class RegistrationEvaluation:
    def __init__(self, items: list[dict], output_dir: str, rem: torch.nn.Module | None, weights: dict[str, str],
                 backbone: str = "fdrn", fdrn_channels=(16, 32, 32, 32, 32), fdrn_num_res: int = 2, scale: float = 4,
                 device="cpu", figure_name: str = "registration_comparison.png") -> None:
        self.items = items
        self.output_dir = Path(output_dir)
        self.rem = rem
        self.weights = weights
        self.backbone = backbone
        self.fdrn = {"fdrn_channels": fdrn_channels, "fdrn_num_res": fdrn_num_res}
        self.scale = float(scale)
        self.device = torch.device(device)
        self.figure_name = figure_name
        self.load = lambda p: EnsureChannelFirst()(LoadImage(image_only=True)(p)).as_tensor()
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    def build(self, method: str) -> torch.nn.Module | None:
        """The network of one row (None: identity); raises a clear error for a broken weights file."""
        if method == "identity":
            return None
        rem = None if method == "backbone_lr" else self.rem
        net = build_registration_network(self.backbone, rem, **self.fdrn)
        path = self.weights[method]
        try:
            net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        except RuntimeError as e:
            raise BundleInputError(f"{path}: weights do not match the configured {self.backbone} cascade "
                                   f"({str(e).splitlines()[0]})") from None
        return net.to(self.device).eval()

    @torch.no_grad()
    def run(self) -> dict:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        available = {m: (m == "identity" or os.path.isfile(self.weights.get(m) or "")) for m in METHODS}
        networks = {m: self.build(m) for m in METHODS if available[m]}
        psnr, ssim = PSNRMetric(max_val=1.0), SSIMMetric(spatial_dims=3, data_range=1.0)
        rows, figure = [], {}
        for item in tqdm(self.items, desc="evaluating pairs", unit="pair"):
            name = item.get("name") or Path(item["moving_image"]).name.split(".")[0]
            fixed_hr, moving_hr = self.load(item["fixed_image"]), self.load(item["moving_image"])
            fixed_label, moving_label = self.load(item["fixed_label"]), self.load(item["moving_label"])
            fixed_lr, moving_lr = degrade(fixed_hr, self.scale), degrade(moving_hr, self.scale)
            pair = torch.cat([moving_lr, fixed_lr])[None].to(self.device)
            for method, net in networks.items():
                start = time.perf_counter()
                if net is None:
                    ddf = torch.zeros((1, 3, *fixed_hr.shape[1:]), device=self.device)
                    inputs = (moving_lr, fixed_lr)
                else:
                    out = net(pair, return_dict=True)
                    ddf = out["ddf"]
                    inputs = (out["sr_moving"][0].cpu(), out["sr_fixed"][0].cpu())
                seconds = time.perf_counter() - start
                ddf_cpu = ddf.float().cpu()
                warped_label = self.warp_label(moving_label[None].float(), ddf_cpu)[0]
                warped_hr = self.warp_image(moving_hr[None], ddf_cpu)[0]
                quality = [(float(psnr(x.clamp(0, 1)[None], hr[None])), float(ssim(x.clamp(0, 1)[None], hr[None])))
                           for x, hr in zip(inputs, (moving_hr, fixed_hr))]
                rows.append({"pair": name, "method": method, "dice": mean_label_dice(warped_label[0], fixed_label[0]),
                             "ncc": global_ncc(warped_hr, fixed_hr), "folding_percent": folding_percent(ddf_cpu[0]),
                             "input_psnr": float(np.mean([q[0] for q in quality])),
                             "input_ssim": float(np.mean([q[1] for q in quality])),
                             "seconds": seconds if net is not None else 0.0})
                if not figure:
                    figure = {"pair": name, "fixed": fixed_hr, "moving": moving_hr}
                if figure.get("pair") == name:
                    figure[method] = {"input_fixed": inputs[1], "warped": self.warp_image(inputs[0][None], ddf_cpu)[0],
                                      "ddf": ddf_cpu[0], "dice": rows[-1]["dice"]}
        summary = self.summarize(rows, available)
        self.write_csv(rows)
        _atomic_write_bytes(self.output_dir / "summary.json", json.dumps(summary, indent=2).encode())
        table = self.markdown_table(summary)
        _atomic_write_bytes(self.output_dir / "results.md", table.encode())
        self.write_figure(figure)
        print("\n" + table)
        print(f"wrote {self.output_dir / 'metrics.csv'}, summary.json, results.md and {self.figure_name}")
        return summary

    def summarize(self, rows: list[dict], available: dict[str, bool]) -> dict:
        metrics = ("dice", "ncc", "folding_percent", "input_psnr", "input_ssim", "seconds")
        summary = {"scale": self.scale, "backbone": self.backbone, "pairs": sorted({r["pair"] for r in rows}),
                   "methods": {}}
        for method in METHODS:
            if not available[method]:
                summary["methods"][method] = {"trained": False, "weights": self.weights.get(method)}
                continue
            rs = [r for r in rows if r["method"] == method]
            summary["methods"][method] = {"trained": True, **{
                m: {"mean": float(np.mean([r[m] for r in rs])), "std": float(np.std([r[m] for r in rs]))}
                for m in metrics}}
        return summary

    def write_csv(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
        _atomic_write_bytes(self.output_dir / "metrics.csv", buffer.getvalue().encode())

    def markdown_table(self, summary: dict) -> str:
        methods = summary["methods"]
        header = "| metric | " + " | ".join(METHODS[m] for m in METHODS) + " |"
        lines = [f"Scale x{self.scale:g}, backbone {self.backbone}, {len(summary['pairs'])} test pairs: "
                 f"{', '.join(summary['pairs'])}", "", header, "|---" * (len(METHODS) + 1) + "|"]
        for metric, label, digits in (("dice", "Dice", 4), ("ncc", "NCC", 4), ("folding_percent", "folding (%)", 3),
                                      ("input_psnr", "input PSNR (dB)", 2), ("seconds", "runtime (s)", 2)):
            cells = []
            for m in METHODS:
                entry = methods[m]
                cells.append("not trained" if not entry["trained"] else
                             f"{entry[metric]['mean']:.{digits}f} ± {entry[metric]['std']:.{digits}f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write_figure(self, data: dict) -> None:
        """Fixed, moving, warped (trilinear input vs SR input) and a deformation grid (the paper's Fig. 5)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not data:
            return
        z = data["fixed"].shape[-1] // 2
        show = lambda v: np.rot90(v[0, :, :, z].numpy())  # noqa: E731
        panels = [("fixed (HR)", show(data["fixed"])), ("moving (HR)", show(data["moving"]))]
        for method, label in (("backbone_lr", "trilinear input"), ("cascade", "SR input")):
            if method in data:
                panels.append((f"{METHODS[method]}\nfixed, {label}", show(data[method]["input_fixed"])))
                panels.append((f"warped, Dice {data[method]['dice']:.3f}", show(data[method]["warped"])))
        grid_method = next((m for m in ("cascade", "backbone_lr") if m in data), None)
        fig, axes = plt.subplots(1, len(panels) + (grid_method is not None), figsize=(2.6 * (len(panels) + 1), 3.2))
        for ax, (title, img) in zip(axes, panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        if grid_method is not None:
            ax = axes[-1]
            ddf = data[grid_method]["ddf"][:2, :, :, z].numpy()
            # (x, y) = (i + u_i, j + u_j) on upward axes matches the rot90 view of the image panels
            u_i, u_j = ddf[0], ddf[1]
            for i in range(0, ddf.shape[1], 6):  # lines of constant first index
                ax.plot(i + u_i[i, :], np.arange(ddf.shape[2]) + u_j[i, :], "g-", linewidth=0.4)
            for j in range(0, ddf.shape[2], 6):  # lines of constant second index
                ax.plot(np.arange(ddf.shape[1]) + u_i[:, j], j + u_j[:, j], "g-", linewidth=0.4)
            ax.set_title(f"deformation grid\n{METHODS[grid_method]}", fontsize=7)
            ax.set_aspect("equal")
            ax.axis("off")
        fig.suptitle(f"{data['pair']} (x{self.scale:g}, axial slice {z})", fontsize=9)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        _atomic_write_bytes(self.output_dir / self.figure_name, buffer.getvalue())
