#!/usr/bin/env python
"""Registration networks on the in-distribution and the held-out generator family: the generalisation table.

A registration bundle's ``configs/evaluate.json`` declares, under ``generalisation``:

- ``sets``: test sets by name, each a dict of config overrides (its datalist or dataset folder, ...); ``{}`` is
  the bundle's default test set;
- ``in_distribution`` and ``heldout``: the names of the set drawn from the training generator and of the set
  from a generator family that training never saw;
- ``methods``: the networks compared (methods of ``evaluate.json``; each runs alone, without instance
  optimisation), ``identity`` first.

For every set this tool runs ``tools/compare_methods.py`` (MONAI's bundle runner, ``evaluate.json``, one run per
method) into ``<output_dir>/<set>``, then builds the table from every method's run folder there (so methods
evaluated by separate calls, e.g. as each finishes training, end up in one table; ``--table_only`` runs nothing
and only rebuilds it) and writes ``<output_dir>/generalisation.md`` and ``.json``: per method, the
mean Dice on each set, its gain over identity, and the ratio of the held-out gain to the in-distribution gain
(the target of SynthMorph-style training is a ratio of at least 0.5). ``--card`` pastes the table into the
model card between ``<!-- generalisation:start -->`` and ``<!-- generalisation:end -->``.

Usage:
    python tools/generalisation.py refdrn [--methods identity cascade] [--sets heldout] [--threads N]
        [--set key=value ...] [--output_dir DIR] [--table_only] [--card]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import compare_methods  # noqa: E402
from tools.fill_model_card import fill  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- generalisation:start -->", "<!-- generalisation:end -->"


def dice(entry) -> float | None:
    """The mean Dice of one compare_methods entry (None when the method is not trained)."""
    if not isinstance(entry, dict) or "dice" not in entry:
        return None
    return float(entry["dice"]["mean"])


def collect(set_dir: Path, methods: list[str]) -> dict:
    """Each method's metrics from its run folder ``<set_dir>/all/<method>`` (compare_methods' layout); "not
    trained" where a method has no run there."""
    out: dict = {}
    for method in methods:
        run = set_dir / "all" / method
        out[method] = (
            compare_methods.read_metrics(run) if (run / "metrics.csv").is_file() else compare_methods.NOT_TRAINED
        )
    return out


def gains(results: dict[str, dict], methods: list[str], sets: list[str], in_dist: str, heldout: str) -> dict:
    """Per method: {set: {"dice", "gain"}} and "ratio" (held-out gain / in-distribution gain; None when either
    is missing or the in-distribution gain is not positive)."""
    out: dict[str, dict] = {}
    for method in methods:
        row: dict = {}
        for name in sets:
            value = dice(results[name].get(method))
            base = dice(results[name].get("identity"))
            row[name] = {"dice": value, "gain": None if value is None or base is None else value - base}
        g_in = row.get(in_dist, {}).get("gain")
        g_out = row.get(heldout, {}).get("gain")
        row["ratio"] = g_out / g_in if g_in is not None and g_out is not None and g_in > 0 else None
        out[method] = row
    return out


def markdown(table: dict, methods: list[str], sets: list[str], labels: dict[str, str], command: str) -> str:
    head = "| method | " + " | ".join(labels.get(s, s) for s in sets) + " | held-out gain / in-distribution gain |"
    lines = [f"`{command}` (network alone; Dice, gain over identity in brackets):", "", head]
    lines.append("|---" * (len(sets) + 2) + "|")
    for method in methods:
        row = table[method]
        cells = []
        for name in sets:
            d, g = row[name]["dice"], row[name]["gain"]
            if d is None:
                cells.append(compare_methods.NOT_TRAINED)
            elif method == "identity" or g is None:
                cells.append(f"{d:.4f}")
            else:
                cells.append(f"{d:.4f} ({g:+.4f})")
        ratio = row["ratio"]
        cells.append("" if method == "identity" else ("n/a" if ratio is None else f"{ratio:.2f}"))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder name under bundles/, or a path to a bundle")
    parser.add_argument("--methods", nargs="+", help="default: the bundle's generalisation methods")
    parser.add_argument("--sets", nargs="+", help="default: every set of the bundle's generalisation")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/generalisation/<bundle>")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--table_only", action="store_true", help="run nothing: rebuild the table from the run folders")
    parser.add_argument("--card", action="store_true", help="paste the table into the bundle's docs/README.md")
    args = parser.parse_args(argv)

    if args.card and (args.sets or args.set):  # before any evaluation runs
        raise SystemExit("error: --card needs every set on the default data (no --sets or --set)")
    bundle_root = compare_methods.find_bundle(args.bundle)
    overrides = compare_methods.parse_overrides(args.set)
    (spec,) = compare_methods.resolve(bundle_root, overrides, "generalisation")
    if not spec:
        raise SystemExit(f"error: {bundle_root.name}'s evaluate.json declares no generalisation sets")
    sets = list(args.sets or spec["sets"])
    unknown = [s for s in sets if s not in spec["sets"]]
    if unknown:
        raise SystemExit(f"error: unknown set(s) {unknown}; {bundle_root.name} has {list(spec['sets'])}")
    to_run = list(args.methods or spec["methods"])
    # the table: every method of the spec (and any other requested), identity first (every gain is over identity)
    methods = ["identity"] + [m for m in dict.fromkeys(list(spec["methods"]) + to_run) if m != "identity"]
    out_dir = (args.output_dir or ROOT / "outputs" / "generalisation" / bundle_root.name).resolve()

    results: dict[str, dict] = {}
    for name in sets:
        if not args.table_only:
            set_overrides = {**spec["sets"][name], **overrides}
            have_identity = (out_dir / name / "all" / "identity" / "metrics.csv").is_file()
            run = to_run if "identity" in to_run or have_identity else ["identity", *to_run]
            cli = [bundle_root.as_posix(), "--methods", *run, "--output_dir", str(out_dir / name)]
            cli += ["--set", *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in set_overrides.items())]
            cli += ["--threads", str(args.threads)] if args.threads else []
            print(f"== {name} ==", flush=True)
            compare_methods.main(cli)
        results[name] = collect(out_dir / name, methods)

    table = gains(results, methods, sets, spec["in_distribution"], spec["heldout"])
    command = (
        f"python tools/generalisation.py {bundle_root.name}"
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --threads {args.threads}" if args.threads else "")
    )
    text = markdown(table, methods, sets, spec.get("labels", {}), command)
    atomic_write_text(text, out_dir / "generalisation.md")
    atomic_write_text(json.dumps({"sets": sets, "methods": table}, indent=2), out_dir / "generalisation.json")
    print("\n" + text)
    for method in methods:
        ratio = table[method]["ratio"]
        if method != "identity" and ratio is not None and math.isfinite(ratio):
            verdict = "met" if ratio >= 0.5 else "missed"
            print(f"{method}: held-out gain / in-distribution gain {ratio:.2f} (target >= 0.5: {verdict})")
    print(f"wrote {out_dir / 'generalisation.md'} and generalisation.json")
    if args.card:
        card = bundle_root / "docs" / "README.md"
        atomic_write_text(fill(card.read_text(), text, START, END), card)
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
