"""tools/verify_bundles.py: the model-zoo checks pass on a complete bundle and catch a broken one."""

import json
import shutil
import subprocess
import sys

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env

TOOL = REPO_ROOT / "tools" / "verify_bundles.py"


def run(*args):
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, env=bundle_env(), cwd=REPO_ROOT, timeout=600
    )


def test_every_shipped_bundle_passes_every_check_with_weights_required():
    """`make verify` as a release runs it: every bundle, weights required, TorchScript export included."""
    result = run("--require-weights")
    assert result.returncode == 0, result.stdout + result.stderr
    for bundle in ("rem_sr", "refdrn", "f3rnet_ct_mri"):
        for check in (
            "required files",
            "metadata schema",
            "versions",
            "network shapes",
            "configs",
            "weights",
            "torchscript export",
        ):
            assert any(
                line.startswith(bundle + " ") and check in line and "PASS" in line
                for line in result.stdout.splitlines()
            ), (bundle, check, result.stdout)
        assert (BUNDLES / bundle / "models" / "model.ts").is_file()


def test_a_broken_bundle_fails_with_named_checks(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(BUNDLES / "rem_sr", broken, ignore=shutil.ignore_patterns("model.ts", "eval", "logs"))
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    meta["monai_version"] = "0.0.1"
    del meta["network_data_format"]["inputs"]["image"]["channel_def"]
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    (broken / "docs" / "data_license.txt").unlink()
    result = run("broken", "--skip-export", "--bundles-dir", str(tmp_path))
    assert result.returncode == 1
    failed = [line for line in result.stdout.splitlines() if "FAIL" in line]
    assert any("required files" in line and "data_license" in line for line in failed)
    assert any("metadata schema" in line for line in failed)
    assert any("versions" in line and "monai_version=0.0.1" in line for line in failed)
    passed = [line for line in result.stdout.splitlines() if "PASS" in line]
    assert any("weights" in line for line in passed)  # the untouched checks still pass
