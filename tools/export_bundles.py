#!/usr/bin/env python
"""Export every bundle that has weights to TorchScript and ONNX, each checked against the eager network.

For each bundle under bundles/ (or the ones named) that has `models/model.pt`:

  models/model.ts    `network_def` of configs/inference.json with the weights, as `monai.bundle ckpt_export` writes it:
                     configs/metadata.json and configs/inference.json embedded as the extra files `metadata.json` and
                     `inference.json` (what MONAI Deploy's MonaiBundleInferenceOperator reads). Scripted where
                     `torch.jit.script` accepts the network, traced otherwise (then the Python control flow is fixed
                     at the trace shape; the row says so). Must match the eager network to 1e-5 (and to 1e-3 of
                     the output's magnitude, which matters for tiny outputs such as untrained displacement heads).
  models/model.onnx  the same network through torch.onnx's dynamo exporter (opset 20), with a dynamic batch axis and
                     dynamic spatial axes derived from the metadata's `spatial_shape` ("16*n" -> any multiple of 16),
                     falling back to a static graph at the metadata shape when the network does not export with
                     dynamic axes; metadata.json and inference.json stored as ONNX `metadata_props`. Checked with
                     onnxruntime on CPU against the eager network to 1e-4 (and 1e-3 relative) at the metadata
                     shape (n=4) and, for a dynamic graph, at a second shape (batch 2, n=2). When the network cannot
                     be exported, the row is SKIP with the exporter's reason; when onnx/onnxruntime/onnxscript are
                     not installed, SKIP with the install command (`pip install -r requirements-optional.txt`).

Bundles without models/model.pt are SKIP (not trained), never a failure. Every file is written under a temporary
name and renamed, so an interrupted export leaves the previous file intact. Each bundle runs in its own process
(every bundle has its own `scripts` package). Exits 1 on any FAIL.

Usage: python tools/export_bundles.py [bundle ...] [--bundles-dir DIR] [--no-onnx]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a script, or imported as a top-level module by verify_bundles
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import atomic_write  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
TS_ATOL = 1e-5
ONNX_ATOL = 1e-4
REL_TOL = 1e-3  # and relative to max |eager output|
ONNX_OPSET = 20  # GridSample on 5-D inputs (3D warps) needs opset 20
EMBEDDED = ("metadata.json", "inference.json")  # extra files of model.ts / metadata_props of model.onnx
ONNX_INSTALL_HINT = "pip install -r requirements-optional.txt (onnx, onnxruntime, onnxscript)"


# ----------------------------------------------------------------------------------- shared with verify_bundles
def read_metadata(root: Path) -> dict:
    return json.loads((root / "configs" / "metadata.json").read_text())


def _eval_dim(expr, n: int) -> int:
    return int(eval(str(expr), {"__builtins__": {}}, {"n": n, "p": n, "any": 1}))  # noqa: S307 (metadata expressions)


def input_shape(root: Path, n: int = 4, batch: int = 1) -> tuple[int, ...]:
    """[batch, channels, *spatial] of the metadata's `image` input, with `n` (and `p`) substituted in spatial_shape."""
    image = read_metadata(root)["network_data_format"]["inputs"]["image"]
    return (batch, int(image["num_channels"]), *(_eval_dim(s, n) for s in image["spatial_shape"]))


def load_network(root: Path, ckpt: Path | None = None):
    """`network_def` of the bundle's inference.json (bundle_root = root), in eval mode, with `ckpt` loaded strictly
    (weights_only) when given. The bundle's folder must be on sys.path (its `scripts` package)."""
    import torch
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def")
    if ckpt is not None:
        net.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True), strict=True)
    return net.eval()


def _close(diff: float, scale: float, atol: float) -> bool:
    """Within `atol`, and within 1e-3 of the output's magnitude, so that the check still means something when the
    outputs are tiny (an untrained registration head gives displacements of ~1e-5)."""
    return diff <= atol and diff <= REL_TOL * scale + 1e-12


def _random_input(shape, seed: int = 0):
    import torch

    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def export_torchscript(
    root: Path, target: Path | None = None, ckpt: Path | None = None, n: int = 4, atol: float = TS_ATOL
) -> str:
    """Export `network_def` + weights to `target` (default models/model.ts) with `monai.bundle.ckpt_export`
    (scripted, or traced at the metadata shape where scripting fails), with metadata.json and inference.json
    embedded; check the embedded files and the output against the eager network. Returns a one-line summary."""
    import torch
    from monai.bundle import ckpt_export

    root = Path(root)
    target = Path(target or root / "models" / "model.ts")
    ckpt = Path(ckpt or root / "models" / "model.pt")
    shape = input_shape(root, n)
    how = {}

    def write(tmp: Path) -> None:
        common = dict(
            net_id="network_def",
            filepath=str(tmp),
            ckpt_file=str(ckpt),
            meta_file=str(root / "configs" / "metadata.json"),
            config_file=str(root / "configs" / "inference.json"),
            bundle_root=str(root),
        )
        try:
            ckpt_export(use_trace=False, **common)
            how["mode"] = "scripted"
        except Exception as e:  # e.g. networks with shape-dependent Python control flow or Warp: trace them
            how["mode"] = "traced"
            how["why"] = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            ckpt_export(use_trace=True, input_shape=list(shape), **common)
        loaded = torch.jit.load(str(tmp), map_location="cpu", _extra_files=(extra := dict.fromkeys(EMBEDDED, "")))
        embedded_meta = json.loads(extra["metadata.json"])
        if embedded_meta.get("version") != read_metadata(root)["version"]:
            raise AssertionError("metadata.json embedded in the TorchScript file does not match configs/metadata.json")
        if json.loads(extra["inference.json"]) != json.loads((root / "configs" / "inference.json").read_text()):
            raise AssertionError(
                "inference.json embedded in the TorchScript file does not match configs/inference.json"
            )
        net = load_network(root, ckpt)
        x = _random_input(shape)
        with torch.no_grad():
            ref = net(x)
            diff = float((loaded(x) - ref).abs().max())
        how["diff"] = diff
        if not _close(diff, float(ref.abs().max()), atol):
            raise AssertionError(
                f"TorchScript output differs from eager by {diff:.2e} (> {atol:g}, or > {REL_TOL:g} "
                f"of max |eager| = {float(ref.abs().max()):.1e}) on {shape}"
            )

    atomic_write(target, write)
    detail = f"{how['mode']}, max |ts - eager| = {how['diff']:.1e} on {shape}, metadata.json + inference.json embedded"
    if how["mode"] == "traced":
        detail += (
            f"; traced at {shape} because scripting failed ({how['why']}): "
            "shape-dependent Python control flow is fixed at that shape"
        )
    return detail


def onnx_missing() -> str | None:
    """None when the ONNX path can run, else the reason (which package is missing)."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed: {ONNX_INSTALL_HINT}" if missing else None


def _dynamic_shapes(root: Path):
    """torch.export dynamic shapes for the `image` input from the metadata: batch dynamic; a spatial entry linear in
    n ("16*n", "n") becomes k * Dim (any multiple of k); anything else (ints, "2**p") stays static."""
    from torch.export import Dim

    image = read_metadata(root)["network_data_format"]["inputs"]["image"]
    dims = {0: Dim("batch", min=1, max=64)}
    for axis, expr in enumerate(image["spatial_shape"]):
        if isinstance(expr, int) or "any" in str(expr):
            continue
        k = _eval_dim(expr, 1)
        if k >= 1 and _eval_dim(expr, 2) == 2 * k and _eval_dim(expr, 3) == 3 * k:
            base = Dim(f"n{axis}", min=1, max=max(1, 2048 // k))
            dims[axis + 2] = base * k if k > 1 else Dim(f"s{axis}", min=2, max=2048)
    return dims


def export_onnx(
    root: Path, target: Path | None = None, ckpt: Path | None = None, n: int = 4, atol: float = ONNX_ATOL
) -> str:
    """Export `network_def` + weights to `target` (default models/model.onnx) and check it with onnxruntime (CPU)
    against the eager network. Raises NotImplementedError(reason) when the network cannot be exported."""
    import warnings

    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    root = Path(root)
    target = Path(target or root / "models" / "model.onnx")
    ckpt = Path(ckpt or root / "models" / "model.pt")
    net = load_network(root, ckpt)
    shape = input_shape(root, n)
    x = _random_input(shape)
    info = {}

    def write(tmp: Path) -> None:
        errors = []
        for dynamic in (True, False):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        net,
                        (x,),
                        str(tmp),
                        input_names=["image"],
                        output_names=["pred"],
                        opset_version=ONNX_OPSET,
                        dynamo=True,
                        external_data=False,
                        verbose=False,
                        dynamic_shapes=(_dynamic_shapes(root),) if dynamic else None,
                    )
                info["dynamic"] = dynamic
                break
            except Exception as e:  # the exporter's reason is reported, the next variant tried
                errors.append(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
        else:
            raise NotImplementedError(f"torch.onnx.export failed: {errors[-1]}")
        model = onnx.load(str(tmp))
        for key in EMBEDDED:
            prop = model.metadata_props.add()
            prop.key = key
            prop.value = json.dumps(json.loads((root / "configs" / key).read_text()))
        onnx.save(model, str(tmp))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        checks = [(shape, x)] + (
            [(s2 := input_shape(root, 2, batch=2), _random_input(s2, seed=1))] if info["dynamic"] else []
        )
        info["diffs"] = []
        for s, inp in checks:
            with torch.no_grad():
                ref = net(inp).numpy()
            out = session.run(None, {session.get_inputs()[0].name: inp.numpy()})[0]
            if out.shape != ref.shape:
                raise AssertionError(f"ONNX output shape {out.shape} != eager {ref.shape} on {s}")
            diff, scale = float(np.abs(out - ref).max()), float(np.abs(ref).max())
            info["diffs"].append((s, diff, scale))
            if not _close(diff, scale, atol):
                raise AssertionError(
                    f"ONNX output differs from eager by {diff:.2e} (> {atol:g}, or > {REL_TOL:g} of "
                    f"max |eager| = {scale:.1e}) on {s}"
                )

    atomic_write(target, write)
    axes = "dynamic batch + spatial axes from metadata" if info["dynamic"] else f"static shape {shape}"
    diffs = ", ".join(f"{d:.1e} on {s} (|eager| max {m:.1e})" for s, d, m in info["diffs"])
    return f"opset {ONNX_OPSET}, {axes}; max |onnxruntime - eager| = {diffs}"


# ------------------------------------------------------------------------------------------------------ driver
def run_worker(bundle: str, bundles_dir: Path, with_onnx: bool) -> int:
    """Runs in a subprocess: exports one bundle, results as JSON lines on stdout."""
    root = bundles_dir / bundle
    sys.path.insert(0, str(root))
    os.chdir(root)

    def row(artefact, ok, detail, trace=None):
        print(json.dumps({"artefact": artefact, "ok": ok, "detail": detail, "trace": trace}), flush=True)

    if not (root / "models" / "model.pt").is_file():
        row("model.ts", None, "no models/model.pt (not trained yet): nothing to export")
        row("model.onnx", None, "no models/model.pt (not trained yet): nothing to export")
        return 0
    for artefact, export in (("model.ts", export_torchscript), ("model.onnx", export_onnx)):
        if artefact == "model.onnx" and (not with_onnx or onnx_missing()):
            row(artefact, None, "--no-onnx" if not with_onnx else onnx_missing())
            continue
        try:
            row(artefact, True, export(root))
        except NotImplementedError as e:  # the network cannot be exported to this format: say why
            row(artefact, None, f"not exportable: {e}")
        except Exception as e:
            detail = f"{type(e).__name__}: {e}".strip().splitlines()[0][:400]
            row(artefact, False, detail, traceback.format_exc()[-3000:])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="bundle names (default: every bundle with configs/metadata.json)")
    parser.add_argument("--bundles-dir", type=Path, default=BUNDLES, help="folder holding the bundles")
    parser.add_argument("--no-onnx", action="store_true", help="TorchScript only")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bundles_dir = args.bundles_dir.resolve()
    if args.worker:
        return run_worker(args.worker, bundles_dir, not args.no_onnx)
    names = args.bundles or sorted(p.parent.parent.name for p in bundles_dir.glob("*/configs/metadata.json"))
    unknown = [n for n in names if not (bundles_dir / n / "configs" / "metadata.json").is_file()]
    if unknown or not names:
        raise SystemExit(
            f"error: no bundle(s) with configs/metadata.json under {bundles_dir}: "
            f"{', '.join(unknown) or '(none found)'}"
        )
    failures = 0
    print(f"{'bundle':<16}{'file':<12}{'result':<7}detail")
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--bundles-dir", str(bundles_dir)]
        cmd += ["--no-onnx"] if args.no_onnx else []
        result = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or len(rows) != 2:
            rows.append(
                {"artefact": "worker", "ok": False, "detail": (result.stderr.strip().splitlines() or ["crashed"])[-1]}
            )
        for row in rows:
            failures += row["ok"] is False
            status = {True: "PASS", False: "FAIL", None: "SKIP"}[row["ok"]]
            print(f"{name:<16}{row['artefact']:<12}{status:<7}{row['detail']}")
            if row["ok"] is False and row.get("trace") and os.environ.get("EXPORT_VERBOSE"):
                print(row["trace"])
    print(f"\n{'export finished' if not failures else f'{failures} export(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
