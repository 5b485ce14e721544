#!/usr/bin/env python
"""Model-zoo checks for every bundle under bundles/ (or the ones named), as the MONAI Model Zoo CI runs them.

Checks per bundle:
 1. required files       configs/metadata.json, LICENSE, models/model.pt, configs/inference.json,
                         docs/README.md, docs/data_license.txt, configs/logging.conf
 2. metadata schema      `monai.bundle.verify_metadata` against tools/schemas/meta_schema_20240725.json (offline)
 3. versions             monai/pytorch/numpy versions in metadata.json equal the pins in requirements.txt
 4. network shapes       `monai.bundle.verify_net_in_out` on `network_def` at the metadata's spatial shape
 5. TorchScript export   `monai.bundle.ckpt_export` to models/model.ts (scripted, or traced where scripting
                         fails; tools/export_bundles.py's export_torchscript); the .ts reloads with metadata.json and
                         inference.json embedded and matches the eager model to 1e-5 on a random input
 6. configs              every config in configs/ parses (override files merged with train.json), every
                         `@` reference resolves, and bundle_root-relative input paths exist
 7. weights              models/model.pt loads with weights_only=True on CPU into network_def, strict=True

A bundle without models/model.pt (not trained yet) is reported honestly: every check that needs the weights
(the model.pt file, the weights and the export, the configs' ckpt_path) is SKIP with "not trained", the other
checks run as usual, and the summary names the bundle as unverified weights. That is not a failure unless
--require-weights is given (use it before a release).

Each bundle is checked in its own process (every bundle has its own `scripts` package). Prints one row
per bundle and check; exits 1 on any failure.

Usage: python tools/verify_bundles.py [bundle ...] [--skip-export] [--require-weights]
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
REQUIRED = (
    "configs/metadata.json",
    "LICENSE",
    "models/model.pt",
    "configs/inference.json",
    "docs/README.md",
    "docs/data_license.txt",
    "configs/logging.conf",
)
OVERRIDE_CONFIGS = ("multi_gpu_train.json", "evaluate.json")  # merged with train.json, as the zoo runs them
INPUT_PATH_KEYS = ("ckpt_path", "rem_bundle")  # bundle_root-relative inputs that must exist in the bundle
WEIGHTS = "models/model.pt"
UNTRAINED = "not trained: no models/model.pt"


class Untrained(Exception):
    """A check that needs models/model.pt, on a bundle that has none (SKIP, or FAIL with --require-weights)."""


def _export_tools():
    """tools/export_bundles.py, which holds the network loading and export code shared by both tools."""
    if __package__:
        from . import export_bundles
    else:  # run as a script: tools/ is on sys.path
        import export_bundles
    return export_bundles


def _require_weights(root: Path) -> Path:
    if not (root / WEIGHTS).is_file():
        raise Untrained(UNTRAINED)
    return root / WEIGHTS


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
    if missing and missing != [WEIGHTS]:
        raise AssertionError(f"missing {', '.join(missing)}")
    if missing:  # everything but the weights is there
        raise Untrained(f"{len(REQUIRED) - 1} of {len(REQUIRED)} files present; {UNTRAINED}")
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
    wrong = [
        f"{key}={meta.get(key)} (pinned {pins[pkg]})"
        for key, pkg in (("monai_version", "monai"), ("pytorch_version", "torch"), ("numpy_version", "numpy"))
        if meta.get(key) != pins[pkg]
    ]
    wrong += [
        f"{pkg}={v} (pinned {pins.get(pkg.lower())})"
        for pkg, v in meta.get("required_packages_version", {}).items()
        if pins.get(pkg.lower()) != v
    ]
    if wrong:
        raise AssertionError("; ".join(wrong))
    return "monai, pytorch, numpy and required packages match requirements.txt"


def _shape_from_metadata(root: Path, n: int = 4) -> tuple[int, ...]:
    return _export_tools().input_shape(root, n)


def check_net_in_out(root: Path) -> str:
    from monai.bundle import verify_net_in_out

    verify_net_in_out(
        net_id="network_def",
        meta_file=str(root / "configs" / "metadata.json"),
        config_file=str(root / "configs" / "inference.json"),
        device="cpu",
        n=4,
        any=1,
    )
    return f"input {_shape_from_metadata(root)} verified"


def check_weights(root: Path) -> str:
    import torch

    ckpt = _require_weights(root)
    net = _export_tools().load_network(root)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return f"{len(state)} tensors loaded strictly ({sum(v.numel() for v in state.values()):,} values)"


def check_export(root: Path) -> str:
    return _export_tools().export_torchscript(root, ckpt=_require_weights(root))


def check_configs(root: Path) -> str:
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    configs = sorted(p.name for p in (root / "configs").glob("*.json") if p.name != "metadata.json")
    checked, untrained = [], set()
    for name in configs:
        files = (
            [root / "configs" / "train.json", root / "configs" / name]
            if name in OVERRIDE_CONFIGS
            else [root / "configs" / name]
        )
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
                    if Path(path).resolve() == (root / WEIGHTS).resolve():
                        untrained.add(name)  # the weights themselves: reported as untrained below
                        continue
                    raise AssertionError(f"{name}: {key} = {path} does not exist")
        checked.append(name)
    detail = f"{len(checked)} configs parse, references resolve: {', '.join(checked)}"
    if untrained:
        raise Untrained(f"{detail}; ckpt_path of {', '.join(sorted(untrained))}: {UNTRAINED}")
    return detail


CHECKS = [
    ("required files", check_required_files),
    ("metadata schema", check_metadata),
    ("versions", check_versions),
    ("network shapes", check_net_in_out),
    ("configs", check_configs),
    ("weights", check_weights),
    ("torchscript export", check_export),
]


def run_worker(bundle: str, skip_export: bool, bundles_dir: Path = BUNDLES, require_weights: bool = False) -> int:
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
        except Untrained as e:  # honest: not checked because there are no weights
            print(
                json.dumps(
                    {"check": name, "ok": False if require_weights else None, "detail": str(e), "untrained": True}
                ),
                flush=True,
            )
        except Exception as e:  # report every failure, keep checking
            detail = f"{type(e).__name__}: {e}".strip().splitlines()[0][:300]
            print(
                json.dumps({"check": name, "ok": False, "detail": detail, "trace": traceback.format_exc()[-2000:]}),
                flush=True,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="bundle names (default: every bundle with configs/metadata.json)")
    parser.add_argument("--skip-export", action="store_true", help="skip the TorchScript export check")
    parser.add_argument(
        "--require-weights",
        action="store_true",
        help="a bundle without models/model.pt fails (default: its weight checks are SKIP)",
    )
    parser.add_argument("--bundles-dir", type=Path, default=BUNDLES, help="folder holding the bundles")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    bundles_dir = args.bundles_dir.resolve()
    if args.worker:
        return run_worker(args.worker, args.skip_export, bundles_dir, args.require_weights)
    names = args.bundles or sorted(p.parent.parent.name for p in bundles_dir.glob("*/configs/metadata.json"))
    unknown = [n for n in names if not (bundles_dir / n).is_dir()]
    if unknown or not names:
        raise SystemExit(f"error: no such bundle(s) under {bundles_dir}: {', '.join(unknown) or '(none found)'}")
    failures, untrained = 0, []
    print(f"{'bundle':<16}{'check':<21}{'result':<7}detail")
    for name in names:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--bundles-dir", str(bundles_dir)]
        cmd += ["--skip-export"] if args.skip_export else []
        cmd += ["--require-weights"] if args.require_weights else []
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 or len(rows) != len(CHECKS):
            rows.append(
                {"check": "worker", "ok": False, "detail": (result.stderr.strip().splitlines() or ["crashed"])[-1]}
            )
        if any(row.get("untrained") for row in rows):
            untrained.append(name)
        for row in rows:
            status = {True: "PASS", False: "FAIL", None: "SKIP"}[row["ok"]]
            failures += row["ok"] is False
            print(f"{name:<16}{row['check']:<21}{status:<7}{row['detail']}")
            if row["ok"] is False and row.get("trace") and os.environ.get("VERIFY_VERBOSE"):
                print(row["trace"])
    print(f"\n{'all checks passed' if not failures else f'{failures} check(s) failed'}")
    if untrained:
        print(f"not trained (no models/model.pt; weights, export and ckpt_path unverified): {', '.join(untrained)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
