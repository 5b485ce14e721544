#!/usr/bin/env python
"""Where a bundle's inference spends its time: one case, stage by stage.

The bundle's own ``configs/inference.json`` runs in this process, as MONAI's bundle runner would run it (its
``initialize`` and ``run`` sections), on one case of its datalist (``--case``), with timers around:

- every transform of ``preprocessing`` (``LoadImaged`` is the *loading* stage, the rest *preprocessing*);
- the network's parts (forward hooks): REM and the backbone for ``refdrn``, REM for ``rem_sr`` (summed over the
  sliding windows), F3RNet for ``f3rnet_ct_mri``; *inferer and transfers* is the rest of the network step
  (window blending, dtype and device copies);
- the instance optimisation of the registration bundles (the step's ``io``), one row per level (its
  ``last_seconds``) and one for the rest of the call (features, final upsampling and composition), as the
  *instance optimisation* stage (its peak RSS is sampled over the whole call);
- every transform of ``postprocessing`` (``SaveImaged`` and the ITK-field writer are the *writing* stage; they queue
  the compression in writer threads, and the wait for those threads at the end of the case is a writing step too);
- the process's start-up (imports, config parsing, network construction, weights) before the first case.

A thread samples the resident memory every 5 ms and keeps its peak per step. Prints a markdown table (stage,
step, seconds, share of the case, peak RSS during the step) and writes ``profile.md`` and ``profile.json``
to ``--output_dir``; with ``--card`` the table goes into the bundle's model card between
``<!-- profile:start -->`` and ``<!-- profile:end -->``. Any other ``--key value`` is a config override, as for
the bundle runner (e.g. ``--precision fp32``).

Usage:
    python tools/profile_inference.py refdrn [--case 0] [--threads 2] [--output_dir DIR] [--card] [--key value ...]
    python tools/profile_inference.py refdrn --bundles_dir /tmp/base/bundles --dataset_dir data/brain_pairs
        (an earlier release, checked out with ``git worktree add /tmp/base <revision>``)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

_T0 = time.perf_counter()

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.compare_methods import parse_value  # noqa: E402
from tools.fill_model_card import fill  # noqa: E402
from tools.niftiio import atomic_write_text  # noqa: E402
from tools.resources import thread_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLES = ("rem_sr", "refdrn", "f3rnet_ct_mri")
MARKERS = ("<!-- profile:start -->", "<!-- profile:end -->")
# the network parts timed per bundle: (label, attribute of the config's `network`; "" = the network itself)
NETWORK_PARTS = {
    "rem_sr": [("REM (all windows)", "")],
    "refdrn": [("REM, moving + fixed", "rem"), ("registration backbone", "backbone")],
    "f3rnet_ct_mri": [("F3RNet", "")],
}
# the single-file overrides of each bundle and the datalist keys they come from
CASE_KEYS = {
    "rem_sr": ("image",),
    "refdrn": ("moving_image", "fixed_image", "moving_label"),
    "f3rnet_ct_mri": ("moving_image", "fixed_image", "moving_label"),
}
WRITERS = ("SaveImaged", "SaveITKDDFd")


def rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc/self/statm``), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Timings:
    """Seconds per (stage, step), in the order the steps were first seen, and the peak resident memory during each
    step (sampled every 5 ms by a thread while `sampling`)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.peak: dict[tuple[str, str], int] = defaultdict(int)
        self.current: list[tuple[str, str]] = [("start-up", "")]

    def add(self, stage: str, step: str, seconds: float) -> None:
        self.seconds[(stage, step)] += seconds

    def enter(self, stage: str, step: str) -> None:
        self.current.append((stage, step))

    def leave(self) -> None:
        if len(self.current) > 1:
            self.current.pop()

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.005):
            key = self.current[-1]
            self.peak[key] = max(self.peak[key], rss_bytes())


class TimedTransform:
    """A transform of a ``Compose``, timed: the wrapped transform's result, its time added to `timings`."""

    def __init__(self, transform, stage: str, step: str, timings: Timings) -> None:
        self.transform, self.stage, self.step, self.timings = transform, stage, step, timings

    def __call__(self, data):
        start = time.perf_counter()
        self.timings.enter(self.stage, self.step)
        try:
            out = self.transform(data)
        finally:
            self.timings.leave()
        self.timings.add(self.stage, self.step, time.perf_counter() - start)
        return out


def step_name(transform) -> str:
    """``ClassName(keys)`` of a dictionary transform, e.g. ``SaveImaged(warped_sr_moving)``."""
    keys = getattr(transform, "keys", None)
    name = type(transform).__name__
    return f"{name}({', '.join(map(str, keys))})" if keys else name


def time_compose(compose, stage_of, timings: Timings) -> None:
    """Wrap every transform of `compose` in a :class:`TimedTransform`; ``stage_of(transform)`` names its stage."""
    compose.transforms = tuple(TimedTransform(t, stage_of(t), step_name(t), timings) for t in compose.transforms)


def hook_module(module, label: str, timings: Timings) -> None:
    """Add the time of every forward call of `module` to the ``network`` stage under `label`."""
    starts: list[float] = []

    def before(*_) -> None:
        timings.enter("network", label)
        starts.append(time.perf_counter())

    def after(*_) -> None:
        timings.add("network", label, time.perf_counter() - starts.pop())
        timings.leave()

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


class TimedIO:
    """The evaluator step's instance optimisation with a timer around each call; its levels become steps of the
    *instance optimisation* stage (``last_seconds``, e.g. ``IO 1/4 grid``)."""

    def __init__(self, io, timings: Timings) -> None:
        self.io, self.timings = io, timings

    def __getattr__(self, name):
        return getattr(self.io, name)

    def __call__(self, *args, **kwargs):
        self.timings.enter("instance optimisation", "IO")
        start = time.perf_counter()
        try:
            out = self.io(*args, **kwargs)
        finally:
            self.timings.leave()
        total = time.perf_counter() - start
        peak = self.timings.peak.pop(("instance optimisation", "IO"), 0)
        rows = [(f"level 1/{f} grid", t) for f, t in zip(self.io.levels, self.io.last_seconds)]
        # the rest of the call: the full-resolution features (pool_features), the final upsampling and composition
        rows.append(("features, final upsampling and composition", max(total - sum(self.io.last_seconds), 0.0)))
        for step, seconds in rows:
            key = ("instance optimisation", step)
            self.timings.add(*key, seconds)
            self.timings.peak[key] = max(self.timings.peak[key], peak)  # sampled over the whole IO
        return out


def case_overrides(bundle: str, parser, case: int) -> dict:
    """The single-file overrides of case `case` of the bundle's default datalist (its ``data_section``)."""
    datalist = Path(parser.get_parsed_content("datalist"))
    dataset_dir = Path(parser.get_parsed_content("dataset_dir"))
    section = parser.get_parsed_content("data_section")
    if not datalist.is_file():
        raise SystemExit(f"error: {datalist}: no such datalist (build the sample data first: see the README)")
    items = json.loads(datalist.read_text()).get(section, [])
    if not 0 <= case < len(items):
        raise SystemExit(f"error: {datalist} [{section}] has {len(items)} case(s); --case {case} is out of range")
    overrides = {}
    for key in CASE_KEYS[bundle]:
        if key in items[case]:
            path = Path(items[case][key])
            overrides[key] = str(path if path.is_absolute() else dataset_dir / path)
    return overrides


def profile(bundle: str, case: int, output_dir: Path, overrides: dict, bundles_dir: Path | None = None) -> dict:
    """Run the bundle's inference on one case with timers; returns the timings and the case's description.
    `bundles_dir` holds the bundles (default: this checkout's; e.g. a worktree of an earlier release)."""
    import resource

    from monai.bundle import ConfigParser

    bundle_root = (bundles_dir or ROOT / "bundles") / bundle
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.update({"bundle_root": str(bundle_root), "output_dir": str(output_dir), **overrides})
    files = case_overrides(bundle, parser, case)
    parser.update({k: v for k, v in files.items() if k not in overrides})
    parser.get_parsed_content("initialize")

    timings = Timings()
    evaluator = parser.get_parsed_content("evaluator")
    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing")
    time_compose(preprocessing, lambda t: "loading" if type(t).__name__ == "LoadImaged" else "preprocessing", timings)
    time_compose(postprocessing, lambda t: "writing" if type(t).__name__ in WRITERS else "postprocessing", timings)
    common = sys.modules.get("scripts.common")
    if common is not None and hasattr(common, "wait_for_writes"):
        # the writer threads' compression, waited for at the end of the iteration (OutputPathsHandler)
        wait = common.wait_for_writes

        def timed_wait() -> None:
            start = time.perf_counter()
            timings.enter("writing", "waiting for the writer threads")
            try:
                wait()
            finally:
                timings.leave()
            timings.add("writing", "waiting for the writer threads", time.perf_counter() - start)

        common.wait_for_writes = timed_wait
    step = getattr(evaluator, "_process_function", None)  # the config's iteration_update (ignite's process function)
    if getattr(step, "io", None) is not None:
        step.io = TimedIO(step.io, timings)
    network = parser.get_parsed_content("network")
    for label, attribute in NETWORK_PARTS[bundle]:
        hook_module(getattr(network, attribute) if attribute else network, label, timings)

    from ignite.engine import Events

    marks: dict[str, float] = {}
    evaluator.add_event_handler(Events.STARTED, lambda _: marks.setdefault("started", time.perf_counter()))
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda _: marks.__setitem__("it", time.perf_counter()))
    evaluator.add_event_handler(
        Events.ITERATION_COMPLETED, lambda _: marks.__setitem__("step", time.perf_counter() - marks["it"])
    )
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda _: timings.enter("network", "inferer and transfers"))
    stop = threading.Event()
    sampler = threading.Thread(target=timings.sample, args=(stop,), daemon=True)
    sampler.start()
    try:
        parser.get_parsed_content("run")
    finally:
        stop.set()
        sampler.join()
    total = time.perf_counter() - marks["started"]
    network_parts = sum(v for (stage, _), v in timings.seconds.items() if stage == "network")
    post = sum(
        v
        for (stage, _), v in timings.seconds.items()
        if stage in ("postprocessing", "writing", "instance optimisation")
    )
    # the handlers after the postprocessing (OutputPathsHandler's wait, counted in `writing`) run in the step too
    other = marks["step"] - network_parts - post
    timings.add("network", "inferer and transfers", max(other, 0.0))
    return {
        "bundle": bundle,
        "files": files,
        "startup_seconds": marks["started"] - _T0,
        "case_seconds": total,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "steps": [
            {"stage": s, "step": n, "seconds": v, "peak_rss_gb": timings.peak.get((s, n), 0) / 1e9}
            for (s, n), v in timings.seconds.items()
        ],
        "startup_peak_rss_gb": timings.peak.get(("start-up", ""), 0) / 1e9,
    }


def markdown(result: dict, command: str) -> str:
    """The profile as a markdown table: a row per step, stage totals, the case total and the start-up."""
    total = result["case_seconds"]
    files = ", ".join(f"`{Path(f).name}`" for f in result["files"].values())
    lines = [
        f"One case ({files}), {result['threads']} thread(s), CPU; produced by `{command}`.",
        "",
        "| stage | step | seconds | share of the case | peak RSS during the step (GB) |",
        "|---|---|---|---|---|",
    ]
    order = ("loading", "preprocessing", "network", "instance optimisation", "postprocessing", "writing")
    for stage in order:
        steps = [s for s in result["steps"] if s["stage"] == stage]
        for s in steps:
            share = 100 * s["seconds"] / total
            peak = f"{s['peak_rss_gb']:.2f}" if s["peak_rss_gb"] else "<5 ms"
            lines.append(f"| {stage} | {s['step']} | {s['seconds']:.2f} | {share:.0f}% | {peak} |")
        if len(steps) > 1:
            subtotal = sum(s["seconds"] for s in steps)
            top = max(s["peak_rss_gb"] for s in steps)
            lines.append(
                f"| **{stage}** | total | **{subtotal:.2f}** | **{100 * subtotal / total:.0f}%** | **{top:.2f}** |"
            )
    lines.append(f"| **case** | loading to the last file written | **{total:.2f}** | 100% | |")
    lines.append(
        f"| start-up | imports, config, network, weights (once per run) | {result['startup_seconds']:.2f} | | "
        f"{result['startup_peak_rss_gb']:.2f} |"
    )
    lines.append("")
    lines.append(f"Peak RSS of the process: {result['peak_rss_gb']:.2f} GB.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", choices=BUNDLES)
    parser.add_argument("--case", type=int, default=0, help="index in the datalist's test section (default 0)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads (default 2)")
    parser.add_argument("--output_dir", type=Path, default=None, help="default outputs/profile/<bundle>")
    parser.add_argument("--card", action="store_true", help="also fill the model card's profile block")
    parser.add_argument(
        "--bundles_dir",
        type=Path,
        help="the bundles to profile (default: this checkout's), e.g. an earlier release's: "
        "git worktree add /tmp/base ce82f87; --bundles_dir /tmp/base/bundles --dataset_dir data/brain_pairs",
    )
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or any(not k.startswith("--") for k in rest[::2]):
        parser.error(f"config overrides come as --key value pairs, got {' '.join(rest)}")
    overrides = {k[2:]: parse_value(v) for k, v in zip(rest[::2], rest[1::2])}
    os.environ.update(thread_env(args.threads))  # before torch is imported
    import torch

    torch.set_num_threads(args.threads)
    out = args.output_dir or ROOT / "outputs" / "profile" / args.bundle
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bundles_dir = args.bundles_dir.resolve() if args.bundles_dir else None
        result = profile(args.bundle, args.case, Path(tmp), overrides, bundles_dir)
    result["threads"] = args.threads
    command = f"python tools/profile_inference.py {args.bundle}" + "".join(
        f" --{k} {json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()
    )
    if args.case:
        command += f" --case {args.case}"
    if args.bundles_dir:
        command += f" --bundles_dir {args.bundles_dir}"
    text = markdown(result, command)
    print(text)
    atomic_write_text(text + "\n", out / "profile.md")
    atomic_write_text(json.dumps(result, indent=2) + "\n", out / "profile.json")
    if args.card:
        card = ROOT / "bundles" / args.bundle / "docs" / "README.md"
        atomic_write_text(fill(card.read_text(), text, *MARKERS), card)
        print(f"updated {card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
