#!/usr/bin/env python
"""Keep the deliberate copies of the shared bundle helpers identical.

Each bundle must work when copied out of this repository on its own, so the helpers that several bundles need
live as identical copies in each bundle's ``scripts/``. One copy is the source; this tool writes it over the
others. ``tests/test_common_copies.py`` fails while any copy differs.

Usage:
    python tools/sync_common.py          # copy each source over its copies
    python tools/sync_common.py --check  # exit 1 and list the copies that differ; change nothing
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ROOT / "bundles"
# shared file -> (bundle holding the source, bundles holding copies)
COPIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "scripts/common.py": ("rem_sr", ("refdrn", "f3rnet_ct_mri")),
    "scripts/registration_metrics.py": ("refdrn", ("f3rnet_ct_mri",)),
    "scripts/pairs.py": ("refdrn", ("f3rnet_ct_mri",)),
    "scripts/intensity.py": ("rem_sr", ("refdrn",)),
    "scripts/itk_ddf.py": ("refdrn", ("f3rnet_ct_mri",)),
    "scripts/figures.py": ("rem_sr", ("refdrn", "f3rnet_ct_mri")),
    "scripts/fast_inference.py": ("rem_sr", ("refdrn", "f3rnet_ct_mri")),
    "scripts/instance_optimisation.py": ("refdrn", ("f3rnet_ct_mri",)),
}


def differing(bundles: Path = BUNDLES) -> list[tuple[Path, Path]]:
    """(source, copy) pairs whose bytes differ (a missing copy counts as differing)."""
    out = []
    for rel, (source, targets) in COPIES.items():
        src = bundles / source / rel
        for target in targets:
            dst = bundles / target / rel
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                out.append((src, dst))
    return out


def sync(bundles: Path = BUNDLES) -> list[Path]:
    """Copy each source over its differing copies; returns the copies written."""
    written = []
    for src, dst in differing(bundles):
        dst.write_bytes(src.read_bytes())
        written.append(dst)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only report copies that differ (exit 1 if any)")
    args = parser.parse_args(argv)
    stale = differing()
    if args.check:
        for src, dst in stale:
            print(f"{dst.relative_to(ROOT)} differs from {src.relative_to(ROOT)}")
        return 1 if stale else 0
    for dst in sync():
        print(f"updated {dst.relative_to(ROOT)}")
    if not stale:
        print("all copies are identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
