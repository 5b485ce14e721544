#!/usr/bin/env python
"""Model-zoo checks for every bundle under bundles/ (or the ones named), as the MONAI Model Zoo CI runs them.

Checks per bundle:
 1. required files       configs/metadata.json, LICENSE, models/model.pt, configs/inference.json,
                         docs/README.md, docs/data_license.txt, configs/logging.conf
 2. metadata schema      `monai.bundle.verify_metadata` against tools/schemas/meta_schema_20240725.json (offline)
 3. versions             monai/pytorch/numpy versions in metadata.json equal the pins in requirements.txt
 4. network shapes       `monai.bundle.verify_net_in_out` on `network_def` at the metadata's spatial shape
 5. TorchScript export   `monai.bundle.ckpt_export` to models/model.ts (scripted, or traced where scripting
                         fails); the .ts reloads and matches the eager model to 1e-5 on a random input
 6. configs              every config in configs/ parses (override files merged with train.json), every
                         `@` reference resolves, and bundle_root-relative input paths exist
 7. weights              models/model.pt loads with weights_only=True on CPU into network_def, strict=True

Each bundle is checked in its own process (every bundle has its own `scripts` package). Prints one row
per bundle and check; exits 1 on any failure.

Usage: python tools/verify_bundles.py [bundle ...] [--skip-export]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
SCHEMA = REPO_ROOT / "tools" / "schemas" / "meta_schema_20240725.json"
REQUIRED = ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json", "docs/README.md",
            "docs/data_license.txt", "configs/logging.conf")
OVERRIDE_CONFIGS = ("multi_gpu_train.json",)  # merged with train.json, as the zoo runs them
INPUT_PATH_KEYS = ("ckpt_path", "rem_bundle")  # bundle_root-relative inputs that must exist in the bundle


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


# ------------------------------------------------------------------------------------------ checks
def check_required_files(root: Path) -> str:
    missing = [rel for rel in REQUIRED if not (root / rel).is_file()]
    if missing:
        raise AssertionError(f"missing {', '.join(missing)}")
    return f"{len(REQUIRED)} files present"


def check_metadata(root: Path) -> str:
    from monai.bundle import verify_metadata

    # verify_metadata downloads the schema only when `filepath` does not exist: the local copy keeps it offline
    verify_metadata(meta_file=str(root / "configs" / "metadata.json"), filepath=str(SCHEMA))
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    if meta["version"] not in meta["changelog"]:
        raise AssertionError(f"version {meta['version']} is not a key of changelog")
    return f"valid against {SCHEMA.name}"


def check_versions(root: Path) -> str:
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    pins = pinned_versions()
    wrong = [f"{key}={meta.get(key)} (pinned {pins[pkg]})" for key, pkg in
             (("monai_version", "monai"), ("pytorch_version", "torch"), ("numpy_version", "numpy"))
             if meta.get(key) != pins[pkg]]
    wrong += [f"{pkg}={v} (pinned {pins.get(pkg.lower())})" for pkg, v in meta.get("required_packages_version", {}).items()
              if pins.get(pkg.lower()) != v]
    if wrong:
        raise AssertionError("; ".join(wrong))
    return "monai, pytorch, numpy and required packages match requirements.txt"


def _shape_from_metadata(root: Path, n: int = 4) -> tuple[int, ...]:
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    spatial = [int(eval(str(s), {"n": n, "p": n, "any": 1})) for s in image["spatial_shape"]]  # noqa: S307
    return (1, int(image["num_channels"]), *spatial)


def check_net_in_out(root: Path) -> str:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=str(root / "configs" / "inference.json"), device="cpu", n=4, any=1)
    return f"input {_shape_from_metadata(root)} verified"


def _network(root: Path):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser["bundle_root"] = str(root)
    return parser.get_parsed_content("network_def")


def check_weights(root: Path) -> str:
    import torch

    net = _network(root)
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return f"{len(state)} tensors loaded strictly ({sum(v.numel() for v in state.values()):,} values)"


def check_export(root: Path) -> str:
    import torch
    from monai.bundle import ckpt_export

    shape = _shape_from_metadata(root)
    common = dict(net_id="network_def", filepath=str(root / "models" / "model.ts"),
                  ckpt_file=str(root / "models" / "model.pt"), meta_file=str(root / "configs" / "metadata.json"),
                  config_file=str(root / "configs" / "inference.json"), bundle_root=str(root))
    try:
        ckpt_export(use_trace=False, **common)
        how = "scripted"
    except Exception:  # networks that use Warp/grid_sample helpers cannot be scripted: trace them
        ckpt_export(use_trace=True, input_shape=list(shape), **common)
        how = "traced"
    loaded = torch.jit.load(str(root / "models" / "model.ts"), map_location="cpu")
    net = _network(root)
    net.load_state_dict(torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded(x) - net(x)).abs().max())
    if diff > 1e-5:
        raise AssertionError(f"TorchScript output differs from eager by {diff:.2e}")
    return f"{how}, max |ts - eager| = {diff:.1e} on {tuple(shape)}"


def check_configs(root: Path) -> str:
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    configs = sorted(p.name for p in (root / "configs").glob("*.json") if p.name != "metadata.json")
    checked = []
    for name in configs:
        files = [root / "configs" / "train.json", root / "configs" / name] if name in OVERRIDE_CONFIGS else [root / "configs" / name]
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser["bundle_root"] = str(root)
        config = parser.get()
        refs = ReferenceResolver.find_refs_in_config(config, id="")
        unresolved = sorted(r for r in refs if r not in parser)
        if unresolved:
            raise AssertionError(f"{name}: unresolved references {unresolved}")
        for key in INPUT_PATH_KEYS:
            if key in parser:
                path = parser.get_parsed_content(key, instantiate=False)
                if isinstance(path, str) and not Path(path).exists():
                    raise AssertionError(f"{name}: {key} = {path} does not exist")
        checked.append(name)
    return f"{len(checked)} configs parse, references resolve: {', '.join(checked)}"


CHECKS = [("required files", check_required_files), ("metadata schema", check_metadata),
          ("versions", check_versions), ("network shapes", check_net_in_out), ("configs", check_configs),
          ("weights", check_weights), ("torchscript export", check_export)]


def run_worker(bundle: str, skip_export: bool, bundles_dir: Path = BUNDLES) -> int:
    """Runs in a subprocess: all checks of one bundle, results as JSON lines on stdout."""
    root = bundles_dir / bundle
    sys.path.insert(0, str(root))
    os.chdir(root)
    for name, check in CHECKS:
        if skip_export and name == "torchscript export":
            print(json.dumps({"check": name, "ok": None, "detail": "skipped"}), flush=True)
            continue
        try:
            detail = check(root)
            print(json.dumps({"check": name, "ok": True, "detail": detail}), flush=True)
        except Exception as e:  # report every failure, keep checking
            detail = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            print(json.dumps({"check": name, "ok": False, "detail": detail,
                              "trace": traceback.format_exc()[-2000:]}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="bundle names (default: every bundle with configs/metadata.json)")
    parser.add_argument("--skip-export", action="store_true", help="skip the TorchScript export check")
    parser.add_argument("--bundles-dir", type=Path, default=BUNDLES, help="folder holding the bundles")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bundles_dir = args.bundles_dir.resolve()
    if args.worker:
        return run_worker(args.worker, args.skip_export, bundles_dir)
    names = args.bundles or sorted(p.parent.parent.name for p in bundles_dir.glob("*/configs/metadata.json"))
    unknown = [n for n in names if not (bundles_dir / n).is_dir()]
    if unknown or not names:
        raise SystemExit(f"error: no such bundle(s) under {bundles_dir}: {', '.join(unknown) or '(none found)'}")
    failures = 0
    print(f"{'bundle':<16}{'check':<21}{'result':<7}detail")
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--bundles-dir", str(bundles_dir)]
        cmd += ["--skip-export"] if args.skip_export else []
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or len(rows) != len(CHECKS):
            rows.append({"check": "worker", "ok": False, "detail": (result.stderr.strip().splitlines() or ["crashed"])[-1]})
        for row in rows:
            status = {True: "PASS", False: "FAIL", None: "SKIP"}[row["ok"]]
            failures += row["ok"] is False
            print(f"{name:<16}{row['check']:<21}{status:<7}{row['detail']}")
            if row["ok"] is False and row.get("trace") and os.environ.get("VERIFY_VERBOSE"):
                print(row["trace"])
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
