"""tools/export_bundles.py (`make export`): TorchScript and ONNX exports checked against the eager networks, and
how export and tools/verify_bundles.py treat a bundle that has no weights yet."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import BUNDLES, REPO_ROOT, bundle_env, load_bundle_scripts

EXPORT = REPO_ROOT / "tools" / "export_bundles.py"
VERIFY = REPO_ROOT / "tools" / "verify_bundles.py"
COPY_IGNORE = shutil.ignore_patterns(
    "model.ts", "*.onnx", "checkpoint_*", "runs", "eval", "logs", "__pycache__", ".partial-*"
)


def bundle_copies(dest: Path, names=("rem_sr", "refdrn"), weights: bool = True, seed: int = 0) -> Path:
    """Copies of the named bundles side by side under `dest` (refdrn finds rem_sr as its sibling). rem_sr keeps its
    trained weights. refdrn keeps its trained models/model.pt once it has one; until then (or always, with
    weights=False, which removes it) it gets a randomly initialised backbone whose flow heads are rescaled so the
    displacement field is not ~0 (the heads are initialised at std 1e-5), so output comparisons mean something."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(BUNDLES / name, dest / name, ignore=COPY_IGNORE)
    ckpt = dest / "refdrn" / "models" / "model.pt"
    if "refdrn" in names and not weights:
        ckpt.unlink(missing_ok=True)
    elif "refdrn" in names and not ckpt.exists():
        config = json.loads((dest / "refdrn" / "configs" / "inference.json").read_text())
        networks = load_bundle_scripts("refdrn", "networks")
        torch.manual_seed(seed)
        net = networks.build_registration_network(
            backbone=config["backbone"],
            rem=None,
            fdrn_channels=config["fdrn_channels"],
            fdrn_num_res=config["fdrn_num_res"],
        )
        g = torch.Generator().manual_seed(seed)
        state = {
            k: torch.randn(v.shape, generator=g) * 0.02
            if ("flow" in k or "aux_head" in k or "final_conv_out" in k) and k.endswith("weight")
            else v
            for k, v in net.state_dict().items()
        }
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, ckpt)
    return dest


def run_tool(tool, *args):
    return subprocess.run(
        [sys.executable, str(tool), *map(str, args)],
        capture_output=True,
        text=True,
        env=bundle_env(),
        cwd=REPO_ROOT,
        timeout=600,
    )


def rows(stdout: str, bundle: str) -> dict[str, str]:
    """{file or check: the row's text after the bundle name} of a tool's table."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith(bundle + " "):
            rest = line[len(bundle) :].strip()
            for key in (
                "model.ts",
                "model.onnx",
                "required files",
                "metadata schema",
                "versions",
                "network shapes",
                "configs",
                "weights",
                "torchscript export",
            ):
                if rest.startswith(key):
                    out[key] = rest[len(key) :].strip()
    return out


def embedded_ts_files(path: Path) -> dict:
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return {k: json.loads(v) for k, v in extra.items()}


def test_rem_sr_exports_scripted_ts_and_dynamic_onnx_that_match_eager(tmp_path):
    copies = bundle_copies(tmp_path, ("rem_sr",))
    result = run_tool(EXPORT, "rem_sr", "--bundles-dir", copies)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout, "rem_sr")
    assert table["model.ts"].startswith("PASS") and "scripted" in table["model.ts"], result.stdout
    root = copies / "rem_sr"
    embedded = embedded_ts_files(root / "models" / "model.ts")
    assert (
        embedded["metadata.json"]["network_data_format"]
        == json.loads((root / "configs" / "metadata.json").read_text())["network_data_format"]
    )
    assert embedded["inference.json"] == json.loads((root / "configs" / "inference.json").read_text())
    assert not list((root / "models").glob(".partial-*"))

    pytest.importorskip("onnxruntime", reason="ONNX path needs requirements-optional.txt")
    pytest.importorskip("onnxscript", reason="ONNX path needs requirements-optional.txt")
    import onnx
    import onnxruntime as ort

    assert table["model.onnx"].startswith("PASS") and "dynamic" in table["model.onnx"], result.stdout
    model = onnx.load(str(root / "models" / "model.onnx"))
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert props["inference.json"] == embedded["inference.json"]
    # an independent check on a shape the tool did not use: batch 3, 24 x 40 x 16 (multiples of 8, "8*n")
    networks = load_bundle_scripts("rem_sr", "networks")
    config = json.loads((root / "configs" / "inference.json").read_text())
    net = networks.REM(k=config["rem_k"], n=config["rem_n"], variant=config["rem_variant"])
    net.load_state_dict(torch.load(root / "models" / "model.pt", weights_only=True))
    x = torch.rand(3, 1, 24, 40, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    out = ort.InferenceSession(str(root / "models" / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"image": x.numpy()}
    )[0]
    assert np.abs(out - ref).max() < 1e-4


def test_refdrn_exports_the_full_cascade_with_rem(tmp_path):
    copies = bundle_copies(tmp_path)
    result = run_tool(EXPORT, "refdrn", "--bundles-dir", copies)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout, "refdrn")
    assert table["model.ts"].startswith("PASS"), result.stdout
    assert "traced" in table["model.ts"] and "scripting failed" in table["model.ts"]  # and it says why
    root = copies / "refdrn"
    declared = json.loads((root / "configs" / "metadata.json").read_text())["bundle_dependencies"]
    assert declared == {"rem_sr": json.loads((copies / "rem_sr" / "configs" / "metadata.json").read_text())["version"]}
    assert embedded_ts_files(root / "models" / "model.ts")["metadata.json"]["bundle_dependencies"] == declared

    # the exported graph is REM -> backbone: it matches the cascade, not the backbone alone
    networks = load_bundle_scripts("refdrn", "networks")
    rem = load_bundle_scripts("refdrn", "rem_loader").load_rem(str(copies / "rem_sr"))
    config = json.loads((root / "configs" / "inference.json").read_text())
    kw = dict(backbone=config["backbone"], fdrn_channels=config["fdrn_channels"], fdrn_num_res=config["fdrn_num_res"])
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    cascade, plain = (
        networks.build_registration_network(rem=rem, **kw),
        networks.build_registration_network(rem=None, **kw),
    )
    cascade.load_state_dict(state)
    plain.load_state_dict(state)
    x = torch.rand(1, 2, 64, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ts = torch.jit.load(str(root / "models" / "model.ts"))(x)
        with_rem, without_rem = cascade.eval()(x), plain.eval()(x)
    assert (ts - with_rem).abs().max() < 1e-5
    assert (ts - without_rem).abs().max() > 100 * float((ts - with_rem).abs().max()) + 1e-4

    if "SKIP" in table["model.onnx"] and "not installed" in table["model.onnx"]:
        pytest.skip(f"ONNX path: {table['model.onnx']}")
    assert table["model.onnx"].startswith("PASS") and "dynamic" in table["model.onnx"], result.stdout


def test_bundle_without_weights_is_skipped_not_failed(tmp_path):
    copies = bundle_copies(tmp_path, weights=False)
    result = run_tool(EXPORT, "refdrn", "--bundles-dir", copies, "--no-onnx")
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout, "refdrn")
    assert table["model.ts"].startswith("SKIP") and "not trained" in table["model.ts"]
    assert not (copies / "refdrn" / "models" / "model.ts").exists()


def test_onnx_path_names_the_missing_packages(monkeypatch):
    import importlib.util

    from tools import export_bundles

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    reason = export_bundles.onnx_missing()
    assert "onnxruntime not installed" in reason and "requirements-optional.txt" in reason


def test_verify_reports_an_untrained_bundle_honestly(tmp_path):
    copies = bundle_copies(tmp_path, weights=False)
    result = run_tool(VERIFY, "refdrn", "--bundles-dir", copies)
    assert result.returncode == 0, result.stdout + result.stderr
    table = rows(result.stdout, "refdrn")
    for check in ("required files", "configs", "weights", "torchscript export"):
        assert table[check].startswith("SKIP") and "not trained" in table[check], (check, result.stdout)
    for check in ("metadata schema", "versions", "network shapes"):
        assert table[check].startswith("PASS"), (check, result.stdout)
    assert "not trained (no models/model.pt; weights, export and ckpt_path unverified): refdrn" in result.stdout
    strict = run_tool(VERIFY, "refdrn", "--bundles-dir", copies, "--require-weights", "--skip-export")
    assert strict.returncode == 1
    assert rows(strict.stdout, "refdrn")["weights"].startswith("FAIL")
