"""Evaluation in the layout of the paper's Tables 2/3 (evaluate.json).

Rows (methods), all on the same held-out pairs and in the configured direction:
- ``identity``: no registration (the paper's "Moving" row; pairs are assumed affinely pre-aligned);
- one row per entry of `weights` (``{variant: weights file}``, e.g. ``none`` -> models/model.pt, ``all`` ->
  models/model_all.pt); a row whose weights file does not exist is reported as "not trained".

Per pair and method: Dice and symmetric average surface distance (mm, MONAI's DiceMetric and
SurfaceDistanceMetric with the fixed image's voxel spacing) per organ of the warped moving label (nearest
neighbour) against the fixed label, their means over the organs, the percentage of voxels with a non-positive
Jacobian determinant (folding), and the network's forward time. Writes metrics.csv (one row per pair and
method), summary.json (means and stds), results.md (the markdown table) and a PNG in the style of the paper's
Fig. 4 (fixed image with its organ contours, the moving image and each warped moving image).
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
from monai.networks.blocks import Warp
from monai.transforms import EnsureChannelFirst, LoadImage
from tqdm import tqdm

from .checks import BundleInputError, check_direction
from .metrics import folding_percent, organ_asd, organ_dice
from .networks import F3D_VARIANTS, F3RNet, count_parameters
from .transforms import MODALITIES, NormalizeCTMRd

VARIANT_TITLES = {
    "identity": "Moving (no registration)",
    "none": "F3RNet-w/o F3D",
    "all": "F3RNet-w/ F3D",
    "encoder": "F3RNet-Enc",
    "decoder": "F3RNet-Dec",
    "fr": "F3RNet-FR",
    "ms": "F3RNet-MS",
    "all_more_mrb": "F3RNet-MRB",
}
DEFAULT_LABELS = {"1": "liver", "2": "spleen", "3": "right kidney", "4": "left kidney"}
# columns of the paper's tables: organ -> label ids averaged per pair (the paper reports one "Kidney")
DEFAULT_GROUPS = {"Liver": [1], "Spleen": [2], "Kidney": [3, 4]}
# contour colours of the paper's figures: liver green, kidney red, spleen blue
CONTOUR_COLOURS = {"liver": "lime", "spleen": "deepskyblue", "right kidney": "red", "left kidney": "red"}


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".partial-{path.name}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def _slug(name: str) -> str:
    return name.lower().replace(" ", "_")


class F3RNetEvaluation:
    def __init__(self, items: list[dict], output_dir: str, weights: dict[str, str], direction: str = "ct2mri",
                 fr_channels: int = 16, ms_channels: int = 32, levels: int = 4, device="cpu",
                 label_names: dict | None = None, table_groups: dict | None = None,
                 ct_window=(-300.0, 500.0), mr_percentiles=(0.0, 99.0), warmup: bool = True,
                 figure_name: str = "registration_comparison.png") -> None:
        self.items = items
        self.output_dir = Path(output_dir)
        self.direction = check_direction(direction)
        self.weights = {str(k): (str(v) if v else "") for k, v in dict(weights or {}).items()}
        unknown = [v for v in self.weights if v not in F3D_VARIANTS]
        if unknown:
            raise BundleInputError(f"evaluate weights: unknown F3RNet variant(s) {unknown}; valid: "
                                   f"{', '.join(F3D_VARIANTS)}")
        self.net_kwargs = {"fr_channels": int(fr_channels), "ms_channels": int(ms_channels), "levels": int(levels)}
        self.device = torch.device(device)
        self.labels = {int(k): str(v) for k, v in (label_names or DEFAULT_LABELS).items()}
        self.num_classes = max(self.labels) + 1
        groups = table_groups or DEFAULT_GROUPS
        self.groups = {str(g): [int(i) for i in ids if int(i) in self.labels] for g, ids in groups.items()}
        self.groups = {g: ids for g, ids in self.groups.items() if ids}
        self.normalize = NormalizeCTMRd(self.direction, ct_window=ct_window, mr_percentiles=mr_percentiles)
        self.warmup = str(warmup).lower() not in ("false", "0", "no", "none")
        self.figure_name = figure_name
        self.load = lambda p: EnsureChannelFirst()(LoadImage(image_only=True)(p))
        self.warp_image = Warp(mode="bilinear", padding_mode="border")
        self.warp_label = Warp(mode="nearest", padding_mode="zeros")

    @property
    def methods(self) -> list[str]:
        return ["identity", *self.weights]

    def build(self, variant: str) -> torch.nn.Module:
        """The network of one row; raises one clear error for a broken or incompatible weights file."""
        net = F3RNet(f3d=variant, **self.net_kwargs)
        path = self.weights[variant]
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise BundleInputError(f"{path}: not a loadable PyTorch state dict ({str(e).splitlines()[0]})") from None
        try:
            net.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as e:
            raise BundleInputError(f"{path}: weights do not match F3RNet variant '{variant}' with "
                                   f"{self.net_kwargs} ({str(e).splitlines()[0]})") from None
        return net.to(self.device).eval()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self) -> dict:
        available = {m: m == "identity" or os.path.isfile(self.weights.get(m) or "") for m in self.methods}
        networks = {m: (None if m == "identity" else self.build(m)) for m in self.methods if available[m]}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        rows, figure, warmed_up = [], {}, set()
        for item in tqdm(self.items, desc="evaluating pairs", unit="pair"):
            name = item.get("name") or Path(item["moving_image"]).name.split(".")[0]
            data = self.normalize({"moving_image": self.load(item["moving_image"]),
                                   "fixed_image": self.load(item["fixed_image"])})
            moving, fixed = (data[k].as_tensor().float() for k in ("moving_image", "fixed_image"))
            spacing = [float(s) for s in data["fixed_image"].pixdim[:3]]
            moving_label = self.load(item["moving_label"]).as_tensor()[None].float()
            fixed_label = self.load(item["fixed_label"]).as_tensor()[None].float()
            pair = torch.cat([moving, fixed])[None].to(self.device)
            for method, net in networks.items():
                if net is None:
                    ddf = torch.zeros((1, 3, *fixed.shape[1:]))
                    warped_label, seconds = moving_label, float("nan")
                else:
                    if self.warmup and method not in warmed_up:
                        net(pair)  # each network's first call allocates; keep it out of the runtime
                        warmed_up.add(method)
                    self._sync()
                    start = time.perf_counter()
                    ddf = net(pair)
                    self._sync()
                    seconds = time.perf_counter() - start
                    ddf = ddf.float().cpu()
                    warped_label = self.warp_label(moving_label, ddf)
                dice = organ_dice(warped_label, fixed_label, self.num_classes)
                asd = organ_asd(warped_label, fixed_label, self.num_classes, spacing)
                row = {"pair": name, "method": method}
                for label_id, organ in sorted(self.labels.items()):
                    row[f"dice_{_slug(organ)}"] = float(dice[label_id - 1])
                for label_id, organ in sorted(self.labels.items()):
                    row[f"asd_{_slug(organ)}_mm"] = float(asd[label_id - 1])
                for group, ids in self.groups.items():
                    row[f"dice_{_slug(group)}_group"] = _nanmean([dice[i - 1] for i in ids])
                    row[f"asd_{_slug(group)}_group_mm"] = _nanmean([asd[i - 1] for i in ids])
                row["dice_mean"] = _nanmean(dice)
                row["asd_mean_mm"] = _nanmean(asd)
                row["folding_percent"] = folding_percent(ddf[0])
                row["seconds"] = seconds
                rows.append(row)
                if not figure:
                    figure = {"pair": name, "fixed": fixed, "moving": moving, "fixed_label": fixed_label[0],
                              "warped": {}}
                if figure["pair"] == name and net is not None:
                    figure["warped"][method] = (self.warp_image(moving[None], ddf)[0], row["dice_mean"])
                if figure["pair"] == name and net is None:
                    figure["identity_dice"] = row["dice_mean"]
        summary = self.summarize(rows, available, networks)
        self.write_csv(rows)
        _atomic_write_bytes(self.output_dir / "summary.json", json.dumps(summary, indent=2).encode())
        table = self.markdown_table(summary)
        _atomic_write_bytes(self.output_dir / "results.md", table.encode())
        self.write_figure(figure)
        print("\n" + table)
        print(f"wrote {self.output_dir / 'metrics.csv'}, summary.json, results.md and {self.figure_name}")
        return summary

    def summarize(self, rows: list[dict], available: dict[str, bool], networks: dict) -> dict:
        metrics = [k for k in rows[0] if k not in ("pair", "method")]
        summary = {"direction": self.direction, "device": str(self.device), "pairs": sorted({r["pair"] for r in rows}),
                   "labels": {str(k): v for k, v in self.labels.items()}, "groups": self.groups, "methods": {}}
        for method in self.methods:
            if not available[method]:
                summary["methods"][method] = {"trained": False, "weights": self.weights.get(method)}
                continue
            rs = [r for r in rows if r["method"] == method]
            entry = {"trained": True, "title": VARIANT_TITLES[method]}
            if networks.get(method) is not None:
                entry["weights"] = self.weights[method]
                entry["parameters"] = count_parameters(networks[method])
            for m in metrics:
                values = np.array([r[m] for r in rs], dtype=float)
                finite = values[~np.isnan(values)]
                entry[m] = {"mean": float(finite.mean()) if finite.size else float("nan"),
                            "std": float(finite.std()) if finite.size else float("nan")}
            summary["methods"][method] = entry
        return summary

    def write_csv(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
        _atomic_write_bytes(self.output_dir / "metrics.csv", buffer.getvalue().encode())

    def markdown_table(self, summary: dict) -> str:
        groups = list(self.groups)
        title = {"ct2mri": "CT-to-MRI (moving CT, fixed MR)", "mri2ct": "MRI-to-CT (moving MR, fixed CT)"}
        kidney_note = "; ".join(f"{g} = mean of {', '.join(self.labels[i] for i in ids)}"
                                for g, ids in self.groups.items() if len(ids) > 1)
        lines = [f"{title[self.direction]}, {len(summary['pairs'])} test pairs ({', '.join(summary['pairs'])}), "
                 f"mean ± std over pairs. ASD: symmetric average surface distance (mm); Dice in %"
                 + (f" ({kidney_note})" if kidney_note else "") + f"; runtime: one forward pass on {summary['device']}.",
                 "",
                 "| Method | " + " | ".join(f"ASD {g} (mm)" for g in groups) + " | "
                 + " | ".join(f"Dice {g} (%)" for g in groups)
                 + " | mean Dice (%) | folding (%) | Params (M) | time (s) |",
                 "|---" * (1 + 2 * len(groups) + 4) + "|"]
        for method in self.methods:
            entry = summary["methods"][method]
            label = VARIANT_TITLES[method]
            if not entry["trained"]:
                lines.append(f"| {label} | " + " | ".join(["not trained"] * (2 * len(groups) + 4)) + " |")
                continue

            def cell(key: str, scale: float = 1.0, digits: int = 2) -> str:
                m, s = entry[key]["mean"] * scale, entry[key]["std"] * scale
                return "n/a" if np.isnan(m) else f"{m:.{digits}f} ± {s:.{digits}f}"

            cells = [cell(f"asd_{_slug(g)}_group_mm") for g in groups]
            cells += [cell(f"dice_{_slug(g)}_group", 100) for g in groups]
            cells += [cell("dice_mean", 100), cell("folding_percent", 1, 3)]
            cells += ["-" if method == "identity" else f"{entry['parameters'] / 1e6:.3f}"]
            cells += ["-" if method == "identity" else cell("seconds")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def _slice(self, label: torch.Tensor) -> int:
        """The axial slice (last axis) with the most liver (label 1), else with the most foreground."""
        lab = label[0]
        organ = (lab == 1) if (lab == 1).any() else (lab > 0)
        counts = organ.flatten(0, 1).sum(0) if organ.ndim == 3 else organ.sum()
        return int(torch.argmax(counts)) if counts.numel() > 1 and counts.max() > 0 else lab.shape[-1] // 2

    def write_figure(self, data: dict) -> None:
        """The paper's Fig. 4 layout: the fixed image with its organ contours (liver green, kidneys red, spleen
        blue), then the moving image and each warped moving image with the same fixed contours on top."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not data:
            return
        z = self._slice(data["fixed_label"])
        # radiological view of an axial slice of a RAS volume: anterior up, the patient's right on the left
        view = lambda a: np.ascontiguousarray(a[::-1, ::-1].T)  # noqa: E731
        show = lambda v: view(v[0, :, :, z].cpu().numpy())  # noqa: E731
        labels = view(data["fixed_label"][0, :, :, z].cpu().numpy())
        roles = MODALITIES[self.direction]
        panels = [(f"fixed ({roles['fixed'].upper()}) + organ contours", show(data["fixed"])),
                  (f"moving ({roles['moving'].upper()}), no registration\nDice {data.get('identity_dice', float('nan')):.3f}",
                   show(data["moving"]))]
        for method, (warped, dice) in data["warped"].items():
            panels.append((f"warped, {VARIANT_TITLES[method]}\nDice {dice:.3f}", show(warped)))
        fig, axes = plt.subplots(1, len(panels), figsize=(2.8 * len(panels), 3.3), squeeze=False)
        for ax, (title, img) in zip(axes[0], panels):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            for label_id, organ in self.labels.items():
                mask = (labels == label_id).astype(float)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=CONTOUR_COLOURS.get(organ, "yellow"), linewidths=0.7)
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        fig.suptitle(f"{data['pair']}: {self.direction}, axial slice {z}; contours: fixed labels "
                     f"(liver green, spleen blue, kidneys red)", fontsize=8)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        _atomic_write_bytes(self.output_dir / self.figure_name, buffer.getvalue())
