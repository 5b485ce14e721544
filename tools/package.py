#!/usr/bin/env python
"""Package bundles as the zips `monai.bundle download` unpacks, plus the model zoo's model_info.json.

For each bundle under bundles/ (or the ones named) that has models/model.pt, writes
<output-dir>/<name>_v<version>.zip with one top-level folder <name>/ holding exactly

    configs/   every file (metadata.json, inference.json, train.json, ..., logging.conf)
    models/    model.pt and any extra weights model_<name>.pt (rem_sr's model_x2.pt); no model.ts /
               model.onnx (`make export` rebuilds them), no checkpoints, no runs/
    scripts/   the bundle's Python package (no __pycache__)
    docs/      model card, data licence, figures
    LICENSE

and nothing else (no eval/, logs/ or hidden files). The zip is reproducible: sorted entries, fixed timestamps
and permissions, so the same bundle always gives the same checksum.

<output-dir>/model_info.json follows Project-MONAI/model-zoo's models/model_info.json: one entry per bundle
version, keyed "<name>_v<version>", with "checksum" (the SHA-1 of the zip, as the zoo's
ci/update_model_info.py computes it), "sha256" (the same zip's SHA-256, for tools that verify with it,
e.g. `monai.bundle download`'s hash check) and "source" (where the zip is downloaded from: --base-url/<zip name>, or
the zip's file:// URL by default, which `python -m monai.bundle download --url` accepts). Existing entries of
other bundles or versions in that file are kept.

Dependencies between bundles are declared in metadata.json as "bundle_dependencies": {"<name>": "<version>"}
(refdrn: {"rem_sr": "0.2.0"}). Packaging checks that every declared bundle exists under the bundles folder, has
weights and a compatible version: the same major version (the same minor version while the major is 0), and not
older than the declared one. Download dependent bundles into the same --bundle_dir: refdrn finds rem_sr as its
sibling folder (`rem_bundle` = bundle_root/../rem_sr).

Bundles without models/model.pt are skipped (reported, not an error). Exits 1 on a bad dependency or bad input.
All files are written under a temporary name and renamed.

Usage: python tools/package.py [bundle ...] [--bundles-dir DIR] [--output-dir outputs/packages] [--base-url URL]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.niftiio import atomic_write, atomic_write_text  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLES = REPO_ROOT / "bundles"
DEFAULT_OUTPUT = REPO_ROOT / "outputs" / "packages"
FOLDERS = ("configs", "scripts", "docs")  # copied whole (minus caches and hidden files)
FILES = ("LICENSE", "models/model.pt")
REQUIRED = ("configs/metadata.json", "configs/inference.json", "LICENSE", "models/model.pt")
SKIP_NAMES = {"__pycache__"}
SKIP_SUFFIXES = (".pyc", ".pyo")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: reproducible zips and checksums


class PackagingError(Exception):
    """Bad input: missing files, unreadable metadata, a missing or incompatible bundle dependency."""


def read_metadata(root: Path) -> dict:
    path = root / "configs" / "metadata.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PackagingError(f"{path}: not found (not a bundle)") from None
    except json.JSONDecodeError as e:
        raise PackagingError(f"{path}: not valid JSON ({e})") from None


def _version_tuple(version: str, where: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in str(version).split("."))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise PackagingError(f"{where}: version {version!r} is not of the form MAJOR.MINOR.PATCH")
    return parts


def compatible(declared: str, actual: str, where: str = "version") -> bool:
    """`actual` satisfies a dependency declared as `declared`: same major (same minor while major is 0), not older."""
    want, have = _version_tuple(declared, where), _version_tuple(actual, where)
    same_series = have[:2] == want[:2] if want[0] == 0 else have[0] == want[0]
    return same_series and have >= want


def check_dependencies(name: str, meta: dict, bundles_dir: Path) -> dict[str, str]:
    """The declared `bundle_dependencies` of bundle `name`, each checked against the bundles folder; returns
    {dependency: its actual version}. Raises PackagingError naming the problem."""
    deps = meta.get("bundle_dependencies", {})
    if not isinstance(deps, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in deps.items()):
        raise PackagingError(
            f"{name}: metadata.json bundle_dependencies must map bundle names to versions, got {deps!r}"
        )
    found = {}
    for dep, declared in sorted(deps.items()):
        root = bundles_dir / dep
        if not (root / "configs" / "metadata.json").is_file():
            raise PackagingError(
                f"{name} depends on bundle {dep} {declared} (metadata.json bundle_dependencies), "
                f"but {root} is not a bundle (no configs/metadata.json): add {dep} to {bundles_dir}"
            )
        actual = read_metadata(root).get("version", "")
        if not compatible(declared, actual, where=f"{dep}"):
            raise PackagingError(
                f"{name} depends on bundle {dep} {declared}, but {root} has version {actual}, "
                f"which is not compatible (needs the same "
                f"{'minor' if _version_tuple(declared, dep)[0] == 0 else 'major'} series, >= {declared})"
            )
        if not (root / "models" / "model.pt").is_file():
            raise PackagingError(
                f"{name} depends on bundle {dep}, but {root}/models/model.pt is missing "
                f"(its weights are used at run time)"
            )
        found[dep] = actual
    return found


def bundle_files(root: Path) -> list[tuple[Path, str]]:
    """(source file, path inside the bundle folder) for everything that goes into the zip, sorted."""
    missing = [rel for rel in REQUIRED if not (root / rel).is_file()]
    if missing:
        raise PackagingError(f"{root}: missing {', '.join(missing)}")
    entries = [(root / rel, rel) for rel in FILES]
    # extra shipped weights beside model.pt (rem_sr's per-degradation models/model_x2.pt, refdrn's backbone_x4.pt and
    # the other rows of its table, f3rnet's other directions and variants)
    extra = sorted((root / "models").glob("model_*.pt")) + sorted((root / "models").glob("backbone_*.pt"))
    entries += [(p, f"models/{p.name}") for p in extra]
    for folder in FOLDERS:
        base = root / folder
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            rel = path.relative_to(root)
            if (
                path.is_file()
                and not any(part in SKIP_NAMES or part.startswith(".") for part in rel.parts)
                and not path.name.endswith(SKIP_SUFFIXES)
            ):
                entries.append((path, rel.as_posix()))
    for path, rel in entries:
        if rel.endswith(".json"):
            try:
                json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise PackagingError(f"{path}: not valid JSON ({e})") from None
    return sorted(entries, key=lambda e: e[1])


def write_zip(name: str, root: Path, target: Path) -> list[str]:
    """The reproducible bundle zip at `target`; returns its member names."""
    entries = bundle_files(root)

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for folder in sorted(
                {f"{name}/"}
                | {f"{name}/{Path(rel).parent.as_posix()}/" for _, rel in entries if Path(rel).parent.as_posix() != "."}
            ):
                info = zipfile.ZipInfo(folder, date_time=ZIP_DATE)
                info.external_attr = (0o40755 << 16) | 0x10
                zf.writestr(info, b"")
            for path, rel in entries:
                info = zipfile.ZipInfo(f"{name}/{rel}", date_time=ZIP_DATE)
                info.external_attr = 0o100644 << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, path.read_bytes())

    atomic_write(target, write)
    with zipfile.ZipFile(target) as zf:
        return zf.namelist()


def file_hash(path: Path, algorithm: str = "sha1") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def update_model_info(path: Path, entries: dict[str, dict]) -> dict:
    info = {}
    if path.is_file():
        try:
            info = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PackagingError(f"{path}: existing model_info.json is not valid JSON ({e})") from None
    info.update(entries)
    info = dict(sorted(info.items()))
    atomic_write_text(json.dumps(info, indent=4) + "\n", path)
    return info


def package(
    names: list[str] | None = None,
    bundles_dir: Path = BUNDLES,
    output_dir: Path = DEFAULT_OUTPUT,
    base_url: str | None = None,
    log=print,
) -> dict[str, dict]:
    """Package the named bundles (default: every bundle with configs/metadata.json); returns the model_info
    entries written. Raises PackagingError on bad input."""
    bundles_dir, output_dir = Path(bundles_dir).resolve(), Path(output_dir).resolve()
    if not bundles_dir.is_dir():
        raise PackagingError(f"{bundles_dir}: bundles folder not found")
    names = names or sorted(p.parent.parent.name for p in bundles_dir.glob("*/configs/metadata.json"))
    if not names:
        raise PackagingError(f"no bundle with configs/metadata.json under {bundles_dir}")
    todo = []
    for name in names:  # check everything before writing anything
        root = bundles_dir / name
        meta = read_metadata(root)
        if not (root / "models" / "model.pt").is_file():
            log(f"SKIP {name}: no models/model.pt (not trained yet): not packaged")
            continue
        version = str(meta.get("version", ""))
        _version_tuple(version, f"{root}/configs/metadata.json")
        deps = check_dependencies(name, meta, bundles_dir)
        bundle_files(root)
        todo.append((name, root, version, deps))
    output_dir.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, root, version, deps in todo:
        zip_path = output_dir / f"{name}_v{version}.zip"
        members = write_zip(name, root, zip_path)
        source = f"{base_url.rstrip('/')}/{zip_path.name}" if base_url else zip_path.as_uri()
        entries[f"{name}_v{version}"] = {
            "checksum": file_hash(zip_path, "sha1"),
            "sha256": file_hash(zip_path, "sha256"),
            "source": source,
        }
        dep_text = f"; depends on {', '.join(f'{d} {v}' for d, v in deps.items())} (found compatible)" if deps else ""
        log(
            f"PACKAGED {name} {version}: {zip_path} ({zip_path.stat().st_size:,} bytes, "
            f"{sum(not m.endswith('/') for m in members)} files){dep_text}"
        )
    if entries:
        update_model_info(output_dir / "model_info.json", entries)
        log(f"model_info.json: {output_dir / 'model_info.json'} ({', '.join(entries)})")
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundles", nargs="*", help="bundle names (default: every bundle with configs/metadata.json)")
    parser.add_argument("--bundles-dir", type=Path, default=BUNDLES, help="folder holding the bundles")
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_OUTPUT, help="where the zips and model_info.json go")
    parser.add_argument(
        "--base-url",
        help="URL the zips will be published under (model_info.json 'source'); default: the zips' file:// URLs",
    )
    args = parser.parse_args(argv)
    try:
        package(args.bundles, args.bundles_dir, args.output_dir, args.base_url)
    except PackagingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
