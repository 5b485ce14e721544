"""Metadata validity and network in/out shapes for every bundle that has a metadata.json."""

import json
import os
import subprocess
import sys

import jsonschema
import pytest

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env
from tools.verify_bundles import pinned_versions

SCHEMA = json.loads((REPO_ROOT / "tools" / "schemas" / "meta_schema_20240725.json").read_text())
BUNDLE_NAMES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/metadata.json"))


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_metadata_matches_schema_and_pins(bundle):
    meta = json.loads((BUNDLES / bundle / "configs" / "metadata.json").read_text())
    jsonschema.validate(meta, SCHEMA)
    assert meta["version"] in meta["changelog"]
    pins = pinned_versions()
    assert meta["monai_version"] == pins["monai"]
    assert meta["pytorch_version"] == pins["torch"]
    assert meta["numpy_version"] == pins["numpy"]
    for package, version in meta["required_packages_version"].items():
        assert pins.get(package.lower()) == version, f"{package} is not pinned at {version} in requirements.txt"


def test_schema_rejects_incomplete_metadata():
    meta = json.loads((BUNDLES / "rem_sr" / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["channel_def"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(meta, SCHEMA)


# bundles whose code is complete but whose weights are not trained yet (open issue); strict: once the
# weights land this xfail fails, and the entry must be removed
UNTRAINED: dict[str, str] = {}  # e.g. {"refdrn": "weights not trained yet (issue N open): models/model.pt is missing"}


@pytest.mark.parametrize(
    "bundle",
    [
        pytest.param(b, marks=pytest.mark.xfail(reason=UNTRAINED[b], strict=True)) if b in UNTRAINED else b
        for b in BUNDLE_NAMES
    ],
)
def test_required_bundle_files(bundle):
    root = BUNDLES / bundle
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/logging.conf",
        "LICENSE",
        "docs/README.md",
        "docs/data_license.txt",
        "models/model.pt",
    ):
        assert (root / rel).is_file(), f"{bundle}: missing {rel}"


@pytest.mark.parametrize("bundle", BUNDLE_NAMES)
def test_verify_net_in_out(bundle):
    root = BUNDLES / bundle
    env = bundle_env()
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(root / "configs" / "metadata.json"),
        "--config_file",
        str(root / "configs" / "inference.json"),
        "--n",
        "4",
        "--any",
        "1",
        "--device",
        "cpu",
    ]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "data shape of network is verified with no error" in (result.stdout + result.stderr)
