#!/usr/bin/env python
"""Evaluate every method of a bundle's comparison table and build the table from MONAI's MetricsSaver files.

A bundle's ``configs/evaluate.json`` (an override of ``train.json``) evaluates ONE method per run, chosen with
``--method``; it lists the methods of its model-card table in ``compare_methods`` and, optionally, a setting to
sweep in ``compare_grid`` (e.g. ``{"eval_scale": [2, 4]}``). This tool runs the bundle's evaluation once per
method (and grid value) with MONAI's bundle runner, each into its own folder, then reads each run's
``metrics.csv`` (the aggregated value of every metric) and ``<metric>_summary.csv`` (statistics over cases)
and writes:

- ``comparison.md``: one table per grid value, a row per metric, a column per method (mean ± std over cases);
- ``comparison.json``: the same numbers;
- ``<grid label>/comparison.png``: when the bundle's ``scripts/evaluate.py`` defines
  ``comparison_figure(runs, path)``, one figure of the same case across every method (each method's figure
  handler leaves its panels as ``figure_panels.npz`` in its run folder; ``runs`` maps method -> run folder).

A method whose weights file (``ckpt_path`` for that method) is set but absent is reported as "not trained".
With ``--card`` the table is pasted into the bundle's model card (between its results markers) and the numeric
``eval_metrics`` of ``configs/metadata.json`` are set to the default method's figures (run times excluded), so
the card, the metadata and the command always agree. A new metric added to a bundle's evaluate.json appears
here without any change.

Usage:
    python tools/compare_methods.py refdrn [--methods identity cascade] [--output_dir DIR] [--card]
        [--set key=value ...] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.fill_model_card import fill  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOT_TRAINED = "not trained"
# run times depend on the machine and its load: in the table, not in the metadata's eval_metrics
MACHINE_DEPENDENT = ("seconds",)


def config_files(bundle_root: Path) -> list[str]:
    """The evaluation's config list: train.json overridden by evaluate.json."""
    return [str(bundle_root / "configs" / "train.json"), str(bundle_root / "configs" / "evaluate.json")]


def bundle_run_command(config: list[str] | str, bundle_root: Path, output_dir: Path, overrides: dict) -> list[str]:
    """The ``python -m monai.bundle run`` command of one run: `config` (a file, or a list merged in order), the bundle
    root, the output folder and ``--key value`` overrides (strings as they are, other values as JSON)."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
    cmd += [config if isinstance(config, str) else json.dumps(config)]
    cmd += ["--bundle_root", str(bundle_root), "--output_dir", str(output_dir)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd


def parse_value(text: str):
    """A command-line value as the bundle runner would read it (JSON when it parses, else the string)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def find_bundle(name: str) -> Path:
    """The resolved root of bundle `name` (a folder name under bundles/, or a path to a bundle).

    Raises:
        SystemExit: the folder has no configs/evaluate.json."""
    bundle_root = Path(name) if Path(name).is_dir() else ROOT / "bundles" / name
    if not (bundle_root / "configs" / "evaluate.json").is_file():
        raise SystemExit(f"error: {bundle_root}: no configs/evaluate.json (not a bundle of this package?)")
    return bundle_root.resolve()


def parse_overrides(items: list[str]) -> dict:
    """``KEY=VALUE`` command-line items as a dict of config overrides (values as :func:`parse_value` reads them).

    Raises:
        SystemExit: an item without ``=``."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --set expects KEY=VALUE, got {item!r}")
        overrides[key] = parse_value(value)
    return overrides


def resolve(bundle_root: Path, overrides: dict, *keys: str) -> list:
    """The parsed values of `keys` of the merged evaluation config under `overrides` (with the bundle's own
    ``scripts`` importable, for values a ``_target_`` of the bundle computes)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_files(bundle_root))
    parser.update({"bundle_root": str(bundle_root), **overrides})
    with bundle_on_path(bundle_root):
        return [parser.get_parsed_content(k) if k in parser else None for k in keys]


def grid_points(grid: dict | None) -> list[dict]:
    """Every combination of the grid's values (one empty point without a grid)."""
    if not grid:
        return [{}]
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def point_label(point: dict) -> str:
    """A folder- and key-friendly label of a grid point: ``eval_scale_4``, or ``eval_scale_1x1x4`` for a list."""

    def text(v) -> str:
        return "x".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, list) else str(v)

    return "_".join(f"{k}_{text(v)}" for k, v in point.items()) or "all"


def read_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """``{metric: {"mean": aggregated value, "std": std over cases}}`` from one MetricsSaver folder.

    Raises:
        SystemExit: the run wrote no metrics.csv.
    """
    path = run_dir / "metrics.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found: the evaluation wrote no metrics")
    out: dict[str, dict[str, float]] = {}
    for row in csv.reader(path.read_text().splitlines()):
        if len(row) < 2 or not row[0].strip():
            continue
        name, value = row[0].strip(), float(row[1])
        entry = {"mean": value, "std": float("nan")}
        summary = run_dir / f"{name}_summary.csv"
        if summary.is_file():
            rows = list(csv.reader(summary.read_text().splitlines(), delimiter="\t"))
            if rows and len(rows[0]) == 1:  # comma-separated
                rows = list(csv.reader(summary.read_text().splitlines()))
            header = rows[0] if rows else []
            for r in rows[1:]:
                if r and r[0] == "mean" and "std" in header:
                    entry["std"] = float(r[header.index("std")])
                    if "notnans" in header:
                        entry["cases"] = float(r[header.index("notnans")])
        out[name] = entry
    return out


def fmt(entry: dict) -> str:
    """``mean ± std`` with digits chosen from the magnitude (NaN std: the mean alone)."""
    mean, std = entry["mean"], entry.get("std", float("nan"))
    if not math.isfinite(mean):
        return "n/a"
    digits = 2 if abs(mean) >= 10 else 4
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) and std > 0 else "")


def markdown(results: dict, methods: list[str], command: str) -> str:
    """The comparison tables (one per grid point) as markdown."""
    lines = [f"Produced by `{command}` (mean ± std over the test cases; MONAI MetricsSaver files per method).", ""]
    for label, by_method in results.items():
        if label != "all":
            lines += [f"**{label}**", ""]
        metrics: list[str] = []
        for m in methods:
            if isinstance(by_method.get(m), dict):
                metrics += [k for k in by_method[m] if k not in metrics]
        lines.append("| metric | " + " | ".join(methods) + " |")
        lines.append("|---" * (len(methods) + 1) + "|")
        for metric in metrics:
            cells = []
            for m in methods:
                entry = by_method.get(m)
                cells.append(NOT_TRAINED if entry == NOT_TRAINED else fmt(entry[metric]) if metric in entry else "n/a")
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


@contextlib.contextmanager
def bundle_on_path(bundle_root: Path):
    """Make the bundle's own ``scripts`` package the importable one while the block runs. Every bundle has its own
    ``scripts`` package, so another bundle's, if one is loaded, is dropped from ``sys.modules`` first."""
    root = str(bundle_root)
    for name in [n for n in sys.modules if n == "scripts" or n.startswith("scripts.")]:
        if not str(getattr(sys.modules[name], "__file__", "") or "").startswith(root):
            del sys.modules[name]
    sys.path.insert(0, root)
    try:
        yield
    finally:
        sys.path.remove(root)


def bundle_scripts(bundle_root: Path, module: str):
    """``scripts.<module>`` of the bundle at `bundle_root` (see :func:`bundle_on_path`)."""
    import importlib

    with bundle_on_path(bundle_root):
        return importlib.import_module(f"scripts.{module}")


def comparison_figures(bundle_root: Path, out_dir: Path, results: dict) -> list[Path]:
    """Call the bundle's ``scripts.evaluate.comparison_figure(runs, path)`` once per grid point, if it has one.

    Returns the figures written (none when the bundle defines no comparison figure or no method ran).
    """
    make = getattr(bundle_scripts(bundle_root, "evaluate"), "comparison_figure", None)
    written = []
    if make is None:
        return written
    for label, by_method in results.items():
        runs = {m: out_dir / label / m for m, entry in by_method.items() if isinstance(entry, dict)}
        if runs:
            path = make(runs, out_dir / label / "comparison.png")
            if path is not None:
                written.append(Path(path))
    return written


def set_eval_metrics(metadata_text: str, metrics: dict[str, float]) -> str:
    """Replace the ``"eval_metrics": {...}`` block of a metadata.json text, keeping the rest of its layout.

    Raises:
        SystemExit: the metadata has no flat eval_metrics block.
    """
    match = re.search(r'^(\s*)"eval_metrics": \{[^{}]*\}', metadata_text, flags=re.M)
    if match is None:
        raise SystemExit('error: metadata.json has no flat "eval_metrics" block to fill')
    indent = match.group(1)
    body = ",\n".join(f'{indent}    "{k}": {json.dumps(round(v, 6))}' for k, v in metrics.items())
    block = f'{indent}"eval_metrics": {{\n{body}\n{indent}}}' if metrics else f'{indent}"eval_metrics": {{}}'
    return metadata_text[: match.start()] + block + metadata_text[match.end() :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle folder name under bundles/, or a path to a bundle")
    parser.add_argument("--methods", nargs="+", help="default: the bundle's compare_methods")
    parser.add_argument("--output_dir", type=Path, help="default: outputs/compare/<bundle>")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides passed to every run (e.g. dataset_dir=/data)",
    )
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each run")
    parser.add_argument(
        "--card",
        action="store_true",
        help="paste the table into docs/README.md and set eval_metrics in configs/metadata.json",
    )
    args = parser.parse_args(argv)

    bundle_root = find_bundle(args.bundle)
    overrides = parse_overrides(args.set)
    all_methods, grid, default_method, general = resolve(
        bundle_root, overrides, "compare_methods", "compare_grid", "method", "generalisation"
    )
    methods = list(args.methods or all_methods or [default_method])
    # the generalisation table's networks (tools/generalisation.py) are methods too, even outside the card's table
    known = list(dict.fromkeys([*(all_methods or []), *(general or {}).get("methods", [])]))
    unknown = [m for m in methods if all_methods and m not in known]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; {bundle_root.name} compares {known}")
    out_dir = (args.output_dir or ROOT / "outputs" / "compare" / bundle_root.name).resolve()
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)

    # compare_grid is this tool's setting (it may be given with --set for a bundle that has none), not a run's
    run_base = {k: v for k, v in overrides.items() if k != "compare_grid"}
    results: dict[str, dict] = {}
    for point in grid_points(grid):
        label = point_label(point)
        results[label] = {}
        for method in methods:
            run_overrides = {**run_base, **point, "method": method}
            (ckpt,) = resolve(bundle_root, run_overrides, "ckpt_path")
            if ckpt and not Path(ckpt).is_file():
                print(f"[{label}] {method}: {NOT_TRAINED} ({ckpt} does not exist)")
                results[label][method] = NOT_TRAINED
                continue
            run_dir = out_dir / label / method
            cmd = bundle_run_command(config_files(bundle_root), bundle_root, run_dir, run_overrides)
            print(f"[{label}] {method}: evaluating into {run_dir}", flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
                raise SystemExit(
                    f"{tail}\nerror: evaluating {bundle_root.name} method {method} ({label}) failed "
                    f"with exit code {proc.returncode}"
                )
            results[label][method] = read_metrics(run_dir)

    command = (
        f"python tools/compare_methods.py {bundle_root.name}"
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --threads {args.threads}" if args.threads else "")
    )
    table = markdown(results, methods, command)
    atomic_write_text(table, out_dir / "comparison.md")
    atomic_write_text(json.dumps(results, indent=2), out_dir / "comparison.json")
    print("\n" + table)
    print(f"wrote {out_dir / 'comparison.md'} and comparison.json")
    for figure in comparison_figures(bundle_root, out_dir, results):
        print(f"wrote {figure}")

    if args.card:
        if args.methods or args.set:
            raise SystemExit("error: --card needs the full comparison on the default data (no --methods, no --set)")
        card = bundle_root / "docs" / "README.md"
        atomic_write_text(fill(card.read_text(), table), card)
        numeric = {}
        for label, by_method in results.items():
            entry = by_method.get(default_method)
            if isinstance(entry, dict):
                suffix = "" if label == "all" else f"_{label}"
                numeric.update(
                    {
                        f"{m}{suffix}": v["mean"]
                        for m, v in entry.items()
                        if math.isfinite(v["mean"]) and m not in MACHINE_DEPENDENT
                    }
                )
        metadata = bundle_root / "configs" / "metadata.json"
        atomic_write_text(set_eval_metrics(metadata.read_text(), numeric), metadata)
        print(f"updated {card} and the eval_metrics of {metadata} ({default_method})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
