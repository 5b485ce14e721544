"""The shared helpers are deliberate copies (each bundle works on its own): they must stay identical."""

from __future__ import annotations

import shutil

from tools import sync_common


def test_shared_helpers_are_identical_in_every_bundle():
    stale = sync_common.differing()
    assert not stale, "copies differ, run `python tools/sync_common.py`: " + ", ".join(str(d) for _, d in stale)


def test_sync_tool_detects_and_repairs_a_diverging_copy(tmp_path, capsys):
    bundles = tmp_path / "bundles"
    shutil.copytree(sync_common.BUNDLES, bundles, ignore=shutil.ignore_patterns("models", "docs", "__pycache__"))
    copy = bundles / "f3rnet_ct_mri" / "scripts" / "common.py"
    copy.write_text(copy.read_text() + "\n# local edit\n")
    assert [d for _, d in sync_common.differing(bundles)] == [copy]
    (bundles / "f3rnet_ct_mri" / "scripts" / "registration_metrics.py").unlink()
    assert len(sync_common.differing(bundles)) == 2
    assert len(sync_common.sync(bundles)) == 2
    assert sync_common.differing(bundles) == []
